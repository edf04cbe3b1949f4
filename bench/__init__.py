"""Benchmarks of the mtproxy-formula cell: `make bench` (bench/run.py) writes bench/results.md."""
