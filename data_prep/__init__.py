"""Data preparation: source files -> the prepared-data folder (see docs/architecture.md).

Entry points: :func:`data_prep.prepare.prepare` and ``python -m data_prep``.
"""
