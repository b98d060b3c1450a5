"""`python -m bench.authorize`: see `bench.authorize` for what it measures."""

from bench.authorize.cli import main

raise SystemExit(main())
