from dpr_hpc.cli import main

raise SystemExit(main())
