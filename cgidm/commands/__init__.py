"""Subcommands of the ``cgidm`` console script, one module each, imported lazily."""
