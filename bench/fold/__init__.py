"""`python -m bench.fold`: the ledger consumer's fold against a plain Kafka consumer (events/s,
where the fold's time goes), its result checked in PostgreSQL and with the audit's `verify`.
What it measures and the figures: README, Benchmarks; the per-event costs: docs/performance.md.
"""
