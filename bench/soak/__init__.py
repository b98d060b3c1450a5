"""`python -m bench.soak`: an open-loop mix against 1 ledger and 2 policy processes for ten
minutes, with a database outage and a broker pause; memory, latency, events, p99 recovery.
What it does and the figures: README, Benchmarks.
"""
