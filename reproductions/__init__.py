"""Reproductions of the source papers' claims, one module per paper (not part of the installed package).

Run from the repository root: ``python -m reproductions.<paper> [--help]``; see ``reproductions/README.md``.
"""
