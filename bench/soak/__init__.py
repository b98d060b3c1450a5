"""Soak benchmark: ten minutes of mixed load at a fixed rate, with two real faults in the middle.

Run from the repository root::

    .venv/bin/python -m bench.soak                              # 600 s at 200 req/s
    .venv/bin/python -m bench.soak --duration 90 --rate 100     # a short check of the bench

A fresh migrated database and a Tansu broker of its own (bench.infra), then one `quota ledger`
and two `quota policy` processes (services.infra.processes: QUOTA_* variables, a service token,
a 6 s consumer session timeout). One asyncio process offers an open-loop mix (bench.soak.load);
at 35% and 65% of the run it stops the database (ALLOW_CONNECTIONS false, sessions terminated)
and then the broker (SIGSTOP) for 10 s each. bench.soak.results turns the records into the
report: RSS per process, latency and statuses per interval, produced against applied events,
verify, p99 recovery after each fault, the targets. Exit status 2 when a target is not met.
"""
