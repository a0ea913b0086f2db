"""The `--data synthetic|nuscenes --dataroot DIR --version V` options every data-consuming verb shares."""

from __future__ import annotations

import argparse
from pathlib import Path

DATA_HELP = "synthetic (default: rendered scenes) or nuscenes (a data root in the official layout)"


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=("synthetic", "nuscenes"), default="synthetic", help=DATA_HELP)
    group.add_argument("--dataroot", help="nuScenes root: the folder holding v1.0-*/, samples/ and sweeps/")
    group.add_argument("--version", default="v1.0-mini", help="nuScenes version folder (default v1.0-mini)")


def data_source(args: argparse.Namespace):
    """The checked DataSource of a command's options (an unreadable root fails here, before any work)."""
    from fusion.data.source import DataSource

    if args.data == "synthetic" and args.dataroot is not None:
        raise ValueError("--dataroot is for --data nuscenes")
    root = Path(args.dataroot) if args.dataroot is not None else None
    return DataSource(args.data, root, args.version).check()
