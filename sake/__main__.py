"""`python -m sake COMMAND ...`: the same as the `sake` command (see :mod:`sake.cli`)."""

from sake.cli import main

raise SystemExit(main())
