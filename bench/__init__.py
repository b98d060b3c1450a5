"""Benchmarks of the quota service; each one is a package run with `python -m bench.<name>`."""
