"""The evidence table that ``cgidm check`` and ``cgidm submit`` print (torch-free: ``submit`` is a
client that runs where torch is not installed)."""

from __future__ import annotations

from typing import Any


def print_table(records: list[dict[str, Any]], set_test: object,
                evidence: dict[str, Any] | None = None) -> None:
    """One line per image (score; p-value and verdict when there were controls), then the set
    test and what the verdicts rest on (``evidence``, the document's entry). ``records`` are the
    per-image documents of results.json or of a service result."""
    width = max(len("image"), *(len(r["name"]) for r in records))
    with_p = records[0].get("p_value") is not None
    header = f"{'image':<{width}}  {'score':>9}" + ("  p-value  verdict" if with_p else "")
    print(header)
    print("-" * len(header))
    for r in records:
        line = f"{r['name']:<{width}}  {r['score']:>9.4f}"
        if with_p:
            line += f"  {r['p_value']:>7.3f}  {r['verdict']}"
        print(line)
    if isinstance(set_test, dict):
        print(
            f"\nset test (one-sided Mann-Whitney U, suspects > controls): "
            f"U={set_test['u_statistic']:.1f}, p={set_test['p_value']:.4g}, "
            f"AUC={set_test['auc']:.3f}"
        )
    if isinstance(set_test, dict) and evidence and evidence.get("score") != "similarity":
        print(f"p-values and verdicts rest on the evidence score: {evidence['description']} "
              "(results.json: evidence_score)")
