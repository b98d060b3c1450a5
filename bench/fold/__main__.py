from bench.fold.cli import main

raise SystemExit(main())
