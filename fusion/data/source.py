"""Where a command's scenes come from: the synthetic renderer (default) or a nuScenes data root.

Every data-consuming command takes the same three options (`--data`, `--dataroot`, `--version`) and
turns them into a `DataSource`; `open_split` then gives the split as a streaming Dataset whose samples
all have the reference model's batch format.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from fusion.config import Config

KINDS = ("synthetic", "nuscenes")
# Our two splits, "train" and "val", in each nuScenes version's official names.
NUSCENES_SPLITS = {
    "v1.0-mini": {"train": "mini_train", "val": "mini_val"},
    "v1.0-trainval": {"train": "train", "val": "val"},
}


class DataSourceError(ValueError):
    """A data source that cannot be opened: the message names the option, folder or file."""


@dataclass(frozen=True)
class DataSource:
    kind: str = "synthetic"
    dataroot: Path | None = None
    version: str = "v1.0-mini"

    def check(self) -> DataSource:
        """Fail before any work on a source that cannot be read."""
        if self.kind not in KINDS:
            raise DataSourceError(f"--data must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "synthetic":
            return self
        if self.dataroot is None:
            raise DataSourceError(
                "--data nuscenes needs --dataroot DIR (the folder holding v1.0-*/, samples/, sweeps/)"
            )
        if not self.dataroot.is_dir():
            raise DataSourceError(f"--dataroot {self.dataroot} is not a folder")
        if self.version not in NUSCENES_SPLITS:
            raise DataSourceError(f"--version must be one of {', '.join(NUSCENES_SPLITS)}, got {self.version!r}")
        if not (self.dataroot / self.version).is_dir():
            present = sorted(p.name for p in self.dataroot.glob("v1.0-*") if p.is_dir())
            raise DataSourceError(
                f"{self.dataroot / self.version} does not exist (versions present: {', '.join(present) or 'none'})"
            )
        return self

    def describe(self) -> dict:
        """What a report records about the data."""
        if self.kind == "synthetic":
            return {"data": "synthetic"}
        return {"data": "nuscenes", "dataroot": str(self.dataroot), "version": self.version}


def check_config_fits(config: Config, source: DataSource) -> None:
    """A model trained on other classes cannot be scored on nuScenes boxes: say so before any work."""
    if source.kind != "nuscenes":
        return
    from fusion.data.nuscenes_tables import DETECTION_CLASSES

    if tuple(config.data.classes) != tuple(DETECTION_CLASSES):
        raise DataSourceError(
            f"the model's classes {list(config.data.classes)} are not the nuScenes detection classes: "
            "train with --preset nuscenes (or nuscenes-tiny) to use --data nuscenes"
        )


def open_split(
    config: Config, source: DataSource, split: str, num_scenes: int | None = None, progress: bool = True
) -> Dataset:
    """The `split` ("train" or "val") of `source` as a streaming Dataset; `num_scenes` takes the first N samples."""
    if split not in ("train", "val"):
        raise DataSourceError(f"split must be 'train' or 'val', got {split!r}")
    if source.kind == "synthetic":
        from fusion.data.dataset import SyntheticScenes

        return SyntheticScenes(config, split, num_scenes=num_scenes, progress=progress)
    check_config_fits(config, source)
    from fusion.data.nuscenes import NuScenesDataset

    dataset = NuScenesDataset(config, source.dataroot, source.version, NUSCENES_SPLITS[source.version][split])
    return _First(dataset, num_scenes) if num_scenes is not None and num_scenes < len(dataset) else dataset


class _First(Dataset):
    """The first `count` samples of a data set (which keeps its `config`, as evaluation reads it)."""

    def __init__(self, dataset: Dataset, count: int):
        self.dataset, self.count, self.config = dataset, count, dataset.config

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"sample {index} of {self.count}")
        return self.dataset[index]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The options every data-consuming verb shares."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        choices=KINDS,
        default="synthetic",
        help="synthetic (default: rendered scenes) or nuscenes (a data root in the official layout)",
    )
    group.add_argument("--dataroot", help="nuScenes root: the folder holding v1.0-*/, samples/ and sweeps/")
    group.add_argument("--version", default="v1.0-mini", help="nuScenes version folder (default v1.0-mini)")


def source_from_args(args: argparse.Namespace) -> DataSource:
    """The checked DataSource of a command's options (an unreadable root fails here, before any work)."""
    if args.data == "synthetic" and args.dataroot is not None:
        raise DataSourceError("--dataroot is for --data nuscenes")
    root = Path(args.dataroot) if args.dataroot is not None else None
    return DataSource(args.data, root, args.version).check()
