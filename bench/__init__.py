"""Benchmarks of stickyray, run as ``python -m bench NAME``; results in ``bench/results``."""
