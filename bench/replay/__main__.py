"""`python -m bench.replay`: see `bench.replay` for what it measures."""

from bench.replay.cli import main

raise SystemExit(main())
