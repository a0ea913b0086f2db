"""Fine-tuning the reference model after pruning: its resumable trainer, masks kept for unstructured runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from fusion.checkpoint import TRAIN_STATE_META
from fusion.data.dataset import SyntheticScenes
from fusion.models.bevfusion import BEVFusion
from fusion.train import check_resumable, fit


@dataclasses.dataclass
class FinetuneConfig:
    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 4
    scenes: int = 500
    seed: int = 0
    threads: int = 2


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
    """
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
    if resume and out_dir is not None and (Path(out_dir) / TRAIN_STATE_META).is_file():
        check_resumable(Path(out_dir), train)  # before rendering: a refused resume costs nothing
    dataset = train_set or SyntheticScenes(model.config, "train", num_scenes=config.scenes, progress=progress)
    meta = {**(metadata or {}), "finetune": dataclasses.asdict(config)}
    return fit(
        model,
        dataset,
        train,
        out_dir,
        resume=resume,
        metadata=meta,
        after_step=keep_zeros(model) if unstructured else None,
        progress=progress,
        desc="fine-tune",
        sync_bn=sync_bn,
    )


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
