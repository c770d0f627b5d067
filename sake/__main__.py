"""`python -m sake COMMAND ...`: the same as the `sake` command (see `sake_cli`)."""

from sake_cli import main

raise SystemExit(main())
