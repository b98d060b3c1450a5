"""`python -m bench.replay`: rebuild every projection from a large event store (stored with
COPY exactly as ingest stores it), checked against the generator's fold. The figures: README,
Benchmarks.
"""
