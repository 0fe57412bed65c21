from r2d2.cli import main

raise SystemExit(main())
