"""Fold throughput benchmark: the ledger consumer against a plain Kafka consumer.

Run from the repository root::

    .venv/bin/python -m bench.fold                   # 200,000 events over 1,000 accounts
    .venv/bin/python -m bench.fold --events 20000    # a quick run
    .venv/bin/python -m bench.fold --help

It starts what it needs (PostgreSQL via `find_or_start_postgres`, a fresh migrated database,
a Tansu broker) unless given `--database-url` / `--kafka-bootstrap` (or the environment
variables `QUOTA_BENCH_DATABASE_URL` / `QUOTA_BENCH_KAFKA_BOOTSTRAP`), produces
`quota.account.usage_recorded` CloudEvents to a fresh 4-partition topic, then measures

* raw: a plain aiokafka consumer that `json.loads` every value, and
* fold: the real `services.ledger.consumer.LedgerConsumer`, until `ledger_head.position`
  reaches the event count,

verifies the result in PostgreSQL, prints a table and writes `.work/bench/fold.json`.
Everything it created (database, topic, broker, embedded server) is removed at the end.
"""
