"""Fine-tuning the reference model after pruning: its resumable trainer, masks kept for unstructured runs,
and optional modality dropout (robust fusion training: a sample now and then trains without one sensor)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fusion.checkpoint import TRAIN_STATE_META, CheckpointError, read_metadata
from fusion.config import Config
from fusion.data.corruptions import cameras_off
from fusion.data.dataset import SyntheticScenes
from fusion.models.bevfusion import BEVFusion
from fusion.train import check_resumable, fit

DROPOUT_STREAM = 0x6D6F6461  # "moda": keeps dropout draws apart from any other generator seeded with (seed, ...)


@dataclasses.dataclass
class FinetuneConfig:
    """modality_dropout: probability p in [0, 1) that a training sample, at a step, loses one sensor: its
    cameras blanked (p/2) or its LiDAR emptied (p/2), never both (`ModalityDropout`); 0 trains as before."""

    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 4
    scenes: int = 500
    seed: int = 0
    threads: int = 2
    modality_dropout: float = 0.0


def check_modality_dropout(p: float) -> float:
    """A dropout probability must lie in [0, 1): at 1 every sample would lose a sensor."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def dropped_modality(p: float, seed: int, step: int, index: int) -> str | None:
    """Which sensor sample `index` loses at `step`: "camera" with probability p/2, "lidar" with p/2, else None.

    One uniform draw from a generator seeded with (seed, step, index) alone decides, so the drops do not
    depend on batch composition, thread count or how many processes train."""
    if p <= 0.0:
        return None
    u = np.random.default_rng([seed, step, index, DROPOUT_STREAM]).random()
    return "camera" if u < p / 2 else "lidar" if u < p else None


def drop_modality(sample: dict[str, Any], modality: str | None, config: Config) -> dict[str, Any]:
    """A copy of `sample` without one sensor, as the robustness failures deliver it: "camera" makes every
    image zero (`cameras_off`), "lidar" swaps the LiDAR inputs for those of an empty sweep (`lidar_off`: no
    pillars and an empty pillar map, or no voxels; the scene is not rendered again). None: the sample itself."""
    if modality is None:
        return sample
    out = dict(sample)
    if modality == "camera":
        out["images"] = cameras_off(np.asarray(sample["images"]))
    elif modality == "lidar":
        from fusion.data.sparse_inputs import lidar_arrays

        empty = np.zeros((0, config.lidar.point_features), dtype=np.float32)
        out.update(lidar_arrays(empty, config, np.random.default_rng(0)))  # an empty sweep draws nothing
    else:
        raise ValueError(f"modality must be 'camera', 'lidar' or None, got {modality!r}")
    return out


class ModalityDropout(Dataset):
    """A training set whose sample `index`, at the current step, has lost a sensor when `dropped_modality`
    says so; the sample is the stored one otherwise (bit for bit).

    `fit` reads a step's samples, then steps the optimizer and calls its `after_step` hook: `advance` is that
    hook, so `step` follows the trainer's step (starting at `start_step` when a run resumes)."""

    def __init__(self, data: Dataset, p: float, seed: int, config: Config, start_step: int = 0):
        self.data, self.p, self.seed, self.config = data, check_modality_dropout(p), seed, config
        self.step = start_step

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        modality = dropped_modality(self.p, self.seed, self.step, index)
        return drop_modality(self.data[index], modality, self.config)

    def advance(self, _model: nn.Module | None = None) -> None:
        self.step += 1


def chain(*hooks: Callable[[nn.Module], None] | None) -> Callable[[nn.Module], None] | None:
    """One after-step hook running the given ones in order (None: none given)."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None

    def run(model: nn.Module) -> None:
        for hook in present:
            hook(model)

    return run


def keep_zeros(model: nn.Module):
    """A step hook that holds every conv/linear weight's current zeros at zero (unstructured pruning)."""
    masks = {
        m: m.weight.detach() != 0 for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    }

    def apply(_model: nn.Module) -> None:
        with torch.no_grad():
            for m, mask in masks.items():
                m.weight.mul_(mask.to(m.weight))  # the weight's dtype and device (a GPU under torchrun)

    return apply


def finetune(
    model: BEVFusion,
    config: FinetuneConfig,
    out_dir: str | Path | None = None,
    metadata: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    train_set: SyntheticScenes | None = None,
    sync_bn: bool = False,
) -> BEVFusion:
    """Fine-tune a pruned model in place. Unstructured models keep their zeros after every step.

    Under torchrun: DDP over the ranks, `config.batch_size` the global batch (see `fusion.train.fit`).
    `config.modality_dropout` > 0 trains on `ModalityDropout` of the training set (fusion models only); a
    resumed run must keep the probability it was started with.
    """
    p = check_modality_dropout(config.modality_dropout)
    if p > 0 and getattr(model, "modality", "fusion") != "fusion":
        raise ValueError(f"modality dropout needs a fusion model, not a {model.modality}-only one")
    unstructured = (metadata or {}).get("pruning", {}).get("kind") == "unstructured"
    train = dataclasses.replace(
        model.config.train,
        steps=config.steps,
        lr=config.lr,
        batch_size=config.batch_size,
        warmup_steps=min(20, config.steps // 10),
        seed=config.seed,
        threads=config.threads,
        checkpoint_every=max(1, config.steps // 3),
    )
    start = 0
    if resume and out_dir is not None and (Path(out_dir) / TRAIN_STATE_META).is_file():
        check_resumable(Path(out_dir), train)  # before rendering: a refused resume costs nothing
        start = resumed_step(Path(out_dir), p)
    dataset = train_set or SyntheticScenes(model.config, "train", num_scenes=config.scenes, progress=progress)
    dropout = ModalityDropout(dataset, p, config.seed, model.config, start) if p > 0 else None
    meta = {**(metadata or {}), "finetune": dataclasses.asdict(config)}
    return fit(
        model,
        dropout or dataset,
        train,
        out_dir,
        resume=resume,
        metadata=meta,
        after_step=chain(keep_zeros(model) if unstructured else None, dropout.advance if dropout else None),
        progress=progress,
        desc="fine-tune",
        sync_bn=sync_bn,
    )


def resumed_step(out: Path, p: float) -> int:
    """The step a fine-tune in `out` resumes from; refused if it was started with another modality dropout."""
    saved = float((read_metadata(out).get("finetune") or {}).get("modality_dropout", 0.0))
    if saved != p:
        raise CheckpointError(f"cannot resume {out}: its modality dropout was {saved:g}, now {p:g}")
    return int(json.loads((out / TRAIN_STATE_META).read_text())["step"])


def imp_finetune_fn(
    config: FinetuneConfig,
    train_set: SyntheticScenes | None,
    unstructured: bool,
    progress: bool = True,
    sync_bn: bool = False,
):
    """IMP's fine-tune between levels for the reference model: `config` with level-specific seeds."""
    kind = {"pruning": {"kind": "unstructured" if unstructured else "structured"}}

    def run(model: BEVFusion, steps: int, level: int) -> None:
        tune = dataclasses.replace(config, steps=steps, seed=config.seed * 100 + level + 1)
        finetune(model, tune, metadata=kind, progress=progress, train_set=train_set, sync_bn=sync_bn)

    return run
