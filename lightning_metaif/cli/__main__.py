"""``python -m lightning_metaif.cli``: the ``lightning-metaif`` command."""

from lightning_metaif.cli import main

raise SystemExit(main())
