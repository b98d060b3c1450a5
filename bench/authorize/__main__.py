from bench.authorize.cli import main

raise SystemExit(main())
