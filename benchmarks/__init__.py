"""Benchmark scripts: each prints a table and ratios and writes its docs/ page.

Run them as modules from the repository root (``python -m benchmarks.NAME``), so they import
each other and :mod:`cgidm_testkit` as packages; nothing edits ``sys.path``.
"""
