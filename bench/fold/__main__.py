"""`python -m bench.fold`: see `bench.fold` for what it measures."""

from bench.fold.cli import main

raise SystemExit(main())
