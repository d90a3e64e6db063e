"""Benchmarks behind ``make bench`` (``python -m pdl1exp.bench``)."""
