"""``python -m triaged.cli``: the same as the ``triaged`` console script."""

from triaged.cli import main

raise SystemExit(main())
