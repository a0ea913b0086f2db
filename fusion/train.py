"""Training loop shared by single-modal pretraining, fusion training and post-pruning fine-tuning.

Deterministic and resumable: the batch order of step s is a pure function of (seed, s), the
learning rate is recomputed from s, and the optimizer state is saved beside the weights as
safetensors + JSON. Resuming from step s therefore continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from common.progress import progress_bar
from fusion.checkpoint import (
    META,
    TRAIN_STATE,
    TRAIN_STATE_META,
    WEIGHTS,
    CheckpointError,
    load_into,
    read_metadata,
    read_weights,
    save_checkpoint,
    verify_files,
)
from fusion.config import TrainConfig
from fusion.data.dataset import SyntheticScenes, collate, model_inputs
from fusion.losses import task_loss
from fusion.models.bevfusion import BEVFusion


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the batch at `step`: epochs are seeded permutations, incomplete last batches dropped."""
    per_epoch = num_samples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training scenes")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 1% of the peak."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=train.lr, weight_decay=train.weight_decay
    )


def train_state(optimizer: torch.optim.Optimizer, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's tensors and its JSON-able rest, for `save_checkpoint(..., train_state=...)`."""
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"step": step, "param_groups": state["param_groups"]}


def load_train_state(directory: Path, optimizer: torch.optim.Optimizer) -> int:
    """Load the optimizer state saved with the weights in `directory`; returns its step."""
    verify_files(directory, [WEIGHTS, META, TRAIN_STATE, TRAIN_STATE_META])
    try:
        meta = json.loads((directory / TRAIN_STATE_META).read_text())
        tensors = load_file(str(directory / TRAIN_STATE))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except Exception as error:  # noqa: BLE001 - any failure means the state cannot be trusted
        raise CheckpointError(f"cannot resume from {directory}: {str(error).splitlines()[0]}") from None
    return int(meta["step"])


def check_resumable(out: Path, train: TrainConfig) -> None:
    """Resume is exact or refused: the saved run must have the same schedule and not be past `steps`."""
    meta = read_metadata(out)
    saved_step, saved = int(meta.get("step", 0)), meta.get("train") or {}
    if saved_step > train.steps:
        raise CheckpointError(f"{out} is at step {saved_step}; --steps {train.steps} is below it (nothing to resume)")
    changed = [
        k
        for k in ("batch_size", "lr", "weight_decay", "warmup_steps", "seed")
        if k in saved and saved[k] != getattr(train, k)
    ]
    if changed:
        k = changed[0]
        raise CheckpointError(f"cannot resume {out}: train.{k} was {saved[k]!r}, now {getattr(train, k)!r}")


def fit(
    model: BEVFusion,
    dataset: SyntheticScenes,
    train: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    metadata: dict | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> BEVFusion:
    """Train `model` for `train.steps` steps; checkpoints to `out_dir` every `train.checkpoint_every` steps.

    `after_step` runs after every optimizer step (fine-tuning uses it to keep pruning masks applied).
    """
    torch.set_num_threads(train.threads)
    optimizer = make_optimizer(model, train)
    out = Path(out_dir) if out_dir is not None else None
    start = 0
    if resume and out is not None and (out / TRAIN_STATE_META).is_file():
        check_resumable(out, train)
        load_into(model, read_weights(out), f"checkpoint {out}")
        start = load_train_state(out, optimizer)

    last_loss: list[float] = []

    def checkpoint(step: int) -> None:
        if out is None:
            return
        meta = {**(metadata or {}), "step": step, "train": train.__dict__}
        if last_loss:
            meta["last_loss"] = last_loss[-1]
        save_checkpoint(out, model, meta, train_state=train_state(optimizer, step))

    model.train()
    bar = progress_bar(range(start, train.steps), desc=desc, enabled=progress, initial=start, total=train.steps)
    for step in bar:
        batch = collate([dataset[i] for i in batch_indices(len(dataset), train.batch_size, train.seed, step)])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train)
        loss, parts = task_loss(model(**model_inputs(batch)), batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}: lower the learning rate")
        last_loss[:] = [float(loss.detach())]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if after_step is not None:
            after_step(model)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
        if (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
            checkpoint(step + 1)
    checkpoint(train.steps)
    model.eval()
    return model


def load_pretrained(model: BEVFusion, sources: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """Initialise a fusion model from single-modal checkpoints: copy every tensor whose name and shape match.

    `sources` maps a label (e.g. "camera") to a state dict; later sources do not overwrite earlier
    ones. Returns how many tensors came from each source.
    """
    own = model.state_dict()
    loaded: dict[str, int] = {}
    taken: set[str] = set()
    for label, state in sources.items():
        matches = {k: v for k, v in state.items() if k in own and k not in taken and own[k].shape == v.shape}
        own.update(matches)
        taken |= set(matches)
        loaded[label] = len(matches)
    model.load_state_dict(own)
    return loaded
