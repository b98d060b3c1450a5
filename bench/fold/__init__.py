"""Fold throughput benchmark: the ledger consumer against a plain Kafka consumer.

Run from the repository root::

    .venv/bin/python -m bench.fold                   # 200,000 events over 1,000 accounts
    .venv/bin/python -m bench.fold --events 20000    # a quick run
    .venv/bin/python -m bench.fold --profile         # the fold under cProfile (slower)
    .venv/bin/python -m bench.fold --help

It starts what it needs (PostgreSQL via `find_or_start_postgres` under `.work/bench`, a fresh
database migrated with Alembic, a Tansu broker) unless given `--database-url` (a *server*: a
scratch database is still created and dropped there) and/or `--kafka-bootstrap` (or the
environment variables `QUOTA_BENCH_DATABASE_URL` / `QUOTA_BENCH_KAFKA_BOOTSTRAP`). It
produces `quota.account.usage_recorded` CloudEvents (structured JSON, keyed by subject) to a
fresh 4-partition topic, then measures

* raw: a plain aiokafka consumer (own group) doing `getmany` + `json.loads` of every value;
* fold: the real `services.ledger.consumer.LedgerConsumer`, from the topic's beginning until
  its committed position reaches the event count.

Headline rates run from partition assignment to the last record (raw) or last committed batch
(fold), so the consumer-group join (about 5 s with Tansu) is left out; the rates including it
are reported too. The fold's phases are timed by wrapping the batch-level functions of
`services.ledger` at runtime (a few wrappers per batch; nothing in `services/` is edited), and
the garbage collector's pauses are recorded with `gc.callbacks`. A per-event CPU table times
the in-Python steps on a sample of the produced values.

At the end the result is checked in PostgreSQL (head position, event_store rows, balances
against the produced amounts, no quarantined events, the hash chain rebuilt), a table is
printed and `.work/bench/fold.json` is written. Everything the run created (database, topic
and groups on a given broker, the broker, an embedded server) is removed. Exit status: 0, or
1 when a correctness check fails, or 2 with `--fail-on-miss` when the ratio misses the target.
"""
