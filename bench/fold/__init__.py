"""Fold throughput benchmark: the ledger consumer against a plain Kafka consumer.

Run from the repository root::

    .venv/bin/python -m bench.fold                   # 200,000 events over 1,000 accounts
    .venv/bin/python -m bench.fold --events 20000    # a quick run

It starts what it needs (bench.infra: a fresh migrated database, a Tansu broker) unless given
`--database-url` / `--kafka-bootstrap`, produces `quota.account.usage_recorded` CloudEvents
(structured JSON, keyed by subject) to a fresh 4-partition topic, then measures

* raw: a plain aiokafka consumer (own group) doing `getmany` + `json.loads` of every value;
* fold: the real `services.ledger.consumer.LedgerConsumer`, from the topic's beginning until
  its head reaches the event count (batches heard through its `on_commit` hook).

Headline rates run from partition assignment to the last record (raw) or last committed batch
(fold), so the consumer-group join (about 5 s with Tansu) is left out; the rates including it
are reported too, with where the fold's time goes: this process's CPU share and the batches'
decode-to-commit times (docs/performance.md splits the CPU cost per event by step). The result
is checked in PostgreSQL (head, event_store rows, balances against the produced amounts, no
quarantine) and with the audit's `verify` (chain and re-fold). Writes `.work/bench/fold.json`.
Exit status: 0, 1 when a check fails, 2 with `--fail-on-miss` when the ratio misses the target.
"""
