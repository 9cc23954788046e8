"""Benchmarks of sendscript, run against the whole service on embedded servers."""
