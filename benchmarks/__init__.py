"""Benchmarks: scripts that print Markdown tables of cost and accuracy (not part of the installed package).

Run from the repository root: ``python -m benchmarks.<name> [--help]``; see ``benchmarks/README.md``.
"""
