from fedlease.cli import main

raise SystemExit(main())
