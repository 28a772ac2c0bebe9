from recipe.retool.sandbox.server import main

raise SystemExit(main())
