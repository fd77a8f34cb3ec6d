"""Benchmarks and maintenance scripts, run as modules from the repository root: ``python -m tools.X --help``.

Shared code is in :mod:`tools.benchlib`; tools/README.md lists every script with its command and its figures.
Importing a tool does no work (no assets read, no sessions made): the work starts in its ``main``.
"""
