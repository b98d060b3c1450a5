"""POST /authorize benchmark: throughput and latency under wrk against its yardsticks, holds,
and how fresh the policy's snapshot is.

Run from the repository root::

    .venv/bin/python -m bench.authorize                 # 10 s per scenario
    .venv/bin/python -m bench.authorize --duration 3 --accounts 1000 --fresh-events 100

It starts what it needs (bench.infra) unless given `--database-url` / `--kafka-bootstrap`, runs
the real ledger (`services.ledger.app.create_app`, its lifespan, `on_commit` stamping commits) in
this process, produces the world (bench.authorize.world) through Kafka, and starts ONE uvicorn
worker (`python -m bench.authorize.server`) serving the policy app, a bare-ASGI ceiling (`/raw`)
and a FastAPI + PostgreSQL-per-request baseline (`/baseline`). Each scenario runs under wrk
(32 connections, 2 threads, `--latency`): ceiling, allowed, denied, baseline, holds
(`estimated_cost` over 8 accounts) and allowed on 1 connection. Then freshness: recharges
produced one at a time, each timed until the policy's snapshot has it. After the run: no
overdraft (held <= balance, held = open holds, one hold per 200 answer, verify). Prints the
tables and the targets; writes `.work/bench/authorize.json`. wrk comes from Debian (the
benchmark runs `apt-get install -y wrk` when it is missing).
"""
