"""``python -m trainer <command>``: see :mod:`trainer.cli`."""

from .cli import main

raise SystemExit(main())
