"""``lightning-metaif store verify DIR``: check every byte of the gradient stores under a folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def find_stores(folder: Path) -> list[Path]:
    """``folder`` if it is a gradient store, else every gradient store below it (e.g. ``metaif/store/rank0``)."""
    from lightning_metaif.influence.store.store import MANIFEST_FORMAT, MANIFEST_NAME

    def is_store(manifest: Path) -> bool:
        try:
            return json.loads(manifest.read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
        except (OSError, ValueError, AttributeError):
            return (
                manifest.parent == folder
            )  # a damaged manifest of the folder itself is reported, not skipped

    if (folder / MANIFEST_NAME).is_file():
        return [folder]
    return sorted(m.parent for m in folder.rglob(MANIFEST_NAME) if is_store(m))


def store_command(args: argparse.Namespace) -> int:
    """Exit code 0: every store intact; 1: damage found (listed); 2: no store under the folder."""
    from lightning_metaif.influence.store import verify_store

    folder: Path = args.dir
    if not folder.is_dir():
        print(f"lightning-metaif store verify: {folder} is not a directory.", file=sys.stderr)
        return 2
    stores = find_stores(folder)
    if not stores:
        print(
            f"lightning-metaif store verify: no gradient store (manifest.json) under {folder}; pass a store "
            "directory or a run directory whose metaif/store holds one.",
            file=sys.stderr,
        )
        return 2
    damaged = 0
    for root in stores:
        report = verify_store(root)
        damaged += not report.ok
        print(report, flush=True)
    if damaged:
        print(f"{damaged} of {len(stores)} store(s) damaged.", flush=True)
    return 1 if damaged else 0
