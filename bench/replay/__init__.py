"""Replay throughput benchmark: rebuild every projection from a large event store.

Run from the repository root::

    .venv/bin/python -m bench.replay                      # 1,000,000 events, 10,000 accounts
    .venv/bin/python -m bench.replay --events 100000      # a quick run
    .venv/bin/python -m bench.replay --help

It finds or starts PostgreSQL (`find_or_start_postgres`, or `--database-url` / the environment
variable `QUOTA_BENCH_DATABASE_URL` naming a *server*), creates and migrates a scratch
database, stores the events straight into `event_store` with COPY (a valid hash chain and
payloads exactly as ingest stores them: built with the contract's models, `canonical_json`,
the chain helpers and the real `fold`, whose projections are written too), then times
`replay --check` and a real rebuild (and optionally the pure reference re-fold), checks the
rebuilt projections against the generator's fold, prints a table with the machine noted and
writes `.work/bench/replay.json`. The scratch database is dropped at the end.
"""
