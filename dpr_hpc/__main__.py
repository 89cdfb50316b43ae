from dpr_hpc.cli.main import main

raise SystemExit(main())
