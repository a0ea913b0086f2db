"""Data subcommands of `altermoma`: `data export-nuscenes` writes synthetic scenes as a nuScenes data root.

    altermoma data export-nuscenes --out DIR [--version v1.0-mini] [--scenes 2] [--samples-per-scene 4]
                                   [--preset nuscenes-tiny] [--sweeps N] [--seed 0] [--overwrite]

The root has every table, JPEG key frames, `.pcd.bin` key frames and sweeps, and official scene names, so
`--data nuscenes --dataroot DIR` and the devkit's evaluation can be exercised without nuScenes itself.
Wired into the main parser by `add_data_parsers(sub)`; user errors are ValueErrors (one `error:` line).
"""

from __future__ import annotations

import argparse

from common.argtypes import non_negative_int, positive_int


def cmd_export_nuscenes(args: argparse.Namespace) -> None:
    from fusion.config import PRESETS, get_config
    from fusion.data.nuscenes_write import write_nuscenes_root

    if args.preset not in PRESETS or not args.preset.startswith("nuscenes"):
        raise ValueError(f"--preset must be a nuScenes preset (nuscenes, nuscenes-tiny), got {args.preset!r}")
    summary = write_nuscenes_root(
        args.out,
        version=args.version,
        scenes=args.scenes,
        config=get_config(args.preset),
        samples_per_scene=args.samples_per_scene,
        sweeps=args.sweeps,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    height, width = summary["camera_size"]
    print(
        f"wrote {summary['out']}: {summary['version']}, {len(summary['scenes'])} scenes ({', '.join(summary['scenes'])}), "
        f"{summary['samples']} samples, {summary['sweeps_per_sample']} sweeps per sample, "
        f"{summary['annotations']} annotations, 6 cameras at {width}x{height}"
    )


def add_data_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data utilities: write synthetic scenes as a nuScenes data root")
    verbs = data.add_subparsers(dest="data_command", required=True)
    p = verbs.add_parser("export-nuscenes", help="render synthetic sequences into a nuScenes-format data root")
    p.add_argument(
        "--out", required=True, help="the data root to write (replaced whole when it was written by this command)"
    )
    p.add_argument("--version", default="v1.0-mini", choices=("v1.0-mini", "v1.0-trainval"))
    p.add_argument(
        "--scenes", type=positive_int, default=2, help="scenes to write (official names, val and train alternating)"
    )
    p.add_argument("--samples-per-scene", type=positive_int, default=4, help="key frames per scene, 2 Hz")
    p.add_argument("--preset", default="nuscenes-tiny", help="nuscenes-tiny (default) or nuscenes: sensors rendered")
    p.add_argument("--sweeps", type=non_negative_int, help="LiDAR sweeps before each key frame (default: the preset's)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder altermoma did not write")
    p.set_defaults(run=cmd_export_nuscenes)
