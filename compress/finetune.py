"""Fine-tuning after pruning: the task loss, the shared training loop, masks kept for unstructured runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compress.unstructured import apply_masks, masks_from_zeros
from fusion.data.dataset import SyntheticScenes
from fusion.models.bevfusion import BEVFusion
from fusion.train import fit


@dataclasses.dataclass
class FinetuneConfig:
    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 4
    scenes: int = 500
    seed: int = 0
    threads: int = 2


def finetune(
    model: BEVFusion,
    config: FinetuneConfig,
    out_dir: str | Path | None = None,
    metadata: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    train_set: SyntheticScenes | None = None,
) -> BEVFusion:
    """Fine-tune a pruned model in place. Unstructured models keep their zeros after every step."""
    unstructured = (metadata or {}).get("pruning", {}).get("kind") == "unstructured"
    masks = masks_from_zeros(model) if unstructured else None
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
    dataset = train_set or SyntheticScenes(model.config, "train", num_scenes=config.scenes, progress=progress)
    after_step = (lambda m: apply_masks(m, masks)) if masks is not None else None
    meta = {**(metadata or {}), "finetune": dataclasses.asdict(config)}
    return fit(
        model,
        dataset,
        train,
        out_dir,
        resume=resume,
        metadata=meta,
        after_step=after_step,
        progress=progress,
        desc="fine-tune",
    )
