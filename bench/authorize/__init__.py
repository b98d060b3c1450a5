"""POST /authorize benchmark: throughput and latency under wrk, against its yardsticks, and
how fresh the policy's snapshot is.

Run from the repository root::

    .venv/bin/python -m bench.authorize                 # 10 s per scenario
    .venv/bin/python -m bench.authorize --duration 5    # quicker
    .venv/bin/python -m bench.authorize --profile       # + cProfile of the server
    .venv/bin/python -m bench.authorize.profile         # in-process µs breakdown (no infra)

It starts what it needs (PostgreSQL via `find_or_start_postgres` with a fresh migrated
database, a Tansu broker) unless given `--database-url` / `--kafka-bootstrap`, runs the real
ledger (`services.ledger.app.create_app` with its lifespan: consumer and heartbeat) in this
process, produces a world of accounts and tokens through Kafka, and starts ONE uvicorn worker
as a child process (`python -m bench.authorize.server`) serving, on one port:

1. `/authorize`, an allowed decision answered from the snapshot;
2. `/authorize`, a denial (an account without balance: checks 1-13 all run);
3. `/raw`, the ceiling: a bare ASGI callable returning a constant JSON;
4. `/baseline`, a plain FastAPI endpoint that asks PostgreSQL per request;

each under wrk (32 connections, 2 threads, POST bodies from a Lua script, `--latency`), plus
an informational 1-connection run of (1). Then:

5. freshness: 1,000 recharges produced to Kafka one at a time, each timed until the policy
   process's snapshot has its position (SnapshotStore.wait_for_position, in the server).

It prints the machine, the scenarios, the freshness percentiles and the targets (allowed /
ceiling >= 0.5, allowed / baseline >= 4, p99 <= 3 ms, freshness p99 <= 100 ms), and writes
`.work/bench/authorize.json`. wrk comes from Debian (`apt-get install -y wrk`); the benchmark
tries that itself when wrk is missing.
"""
