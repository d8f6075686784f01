from distmerge.cli import main

raise SystemExit(main())
