from evomerge.cli import main

raise SystemExit(main())
