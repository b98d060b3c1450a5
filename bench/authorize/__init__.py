"""`python -m bench.authorize`: POST /authorize under wrk against its yardsticks (a bare-ASGI
ceiling, a FastAPI + PostgreSQL baseline), holds, budgets, the snapshot's freshness, and no
overdraft after the run. The scenarios and the figures: README, Benchmarks.
"""
