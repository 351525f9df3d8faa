from daskrun.cli import main

raise SystemExit(main())
