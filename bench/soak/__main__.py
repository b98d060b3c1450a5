"""`python -m bench.soak`: see `bench.soak` for what it measures."""

from bench.soak.cli import main

raise SystemExit(main())
