"""`python -m bench.fold`: the ledger's fold, with policy processes listening, against a plain
Kafka consumer, each from the first event produced (confluent-kafka, its own process) to the
last applied; the ledger's measured time per phase; its result checked in PostgreSQL and with
the audit's `verify`.
What it measures and the figures: README, Benchmarks; the per-event costs: docs/performance.md.
"""
