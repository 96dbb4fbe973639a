"""``python -m sdk.cli``: the ``edgeship`` command without its console script."""

from sdk.cli import main

raise SystemExit(main())
