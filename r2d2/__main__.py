from r2d2.engine.cli import main

raise SystemExit(main())
