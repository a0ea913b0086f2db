"""Training loop shared by single-modal pretraining, fusion training and post-pruning fine-tuning.

Deterministic and resumable: the batch order of step s is a pure function of (seed, s), the
learning rate is recomputed from s, and the optimizer state is saved beside the weights as
safetensors + JSON. Resuming from step s therefore continues exactly where a run stopped.

Under torchrun, `train.batch_size` stays the GLOBAL batch: rank r trains on its contiguous slice of
step s's indices, the model is wrapped in DDP (after any pruning; the optimizer is built after the
wrapping), the loss is normalised by global counts (`fusion.losses`) and, with `sync_bn`, BatchNorm
statistics are those of the global batch: N processes then take one process's steps, up to
summation order. Rank 0 alone writes checkpoints; a checkpoint resumes at any number of processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from common import ddp, dist
from common.finite import NonFiniteLossError, check_finite, describe, non_finite_tensors
from common.progress import progress_bar
from fusion.checkpoint import (
    META,
    TRAIN_STATE,
    TRAIN_STATE_META,
    WEIGHTS,
    CheckpointError,
    NonFiniteCheckpointError,
    load_into,
    read_metadata,
    read_weights,
    save_checkpoint,
    verify_files,
)
from fusion.config import TrainConfig
from fusion.data.dataset import SyntheticScenes, collate, model_inputs
from fusion.losses import Normaliser, local_count
from fusion.models.bevfusion import BEVFusion
from fusion.task import detection_loss


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the batch at `step`: epochs are seeded permutations, incomplete last batches dropped."""
    per_epoch = num_samples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training scenes")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def rank_indices(indices: list[int]) -> list[int]:
    """This rank's contiguous slice of a global batch (all of it in one process)."""
    n = dist.world()
    if len(indices) % n:
        raise ValueError(f"the batch size {len(indices)} is not a multiple of the {n} processes")
    size = len(indices) // n
    return indices[dist.rank() * size : (dist.rank() + 1) * size]


def global_count(count: torch.Tensor) -> torch.Tensor:
    """A batch-wide count summed over the ranks, as each rank's loss divisor (see `fusion.losses`)."""
    total = count.detach().clone()
    dist.all_reduce_sum_(total)
    return total.clamp(min=1.0) / dist.world()


def loss_normaliser() -> Normaliser:
    return global_count if dist.is_distributed() else local_count


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
    tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
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
    check_finite(tensors, f"the optimizer state in {directory}", NonFiniteCheckpointError)
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


def stop_message(what: str, step: int, out: Path | None, saved: int | None) -> str:
    """Why a run stopped at `step` (counted from 1) and what is on disk: the last good checkpoint or nothing."""
    if out is None:
        kept = "nothing was saved"
    elif saved is None:
        kept = f"nothing was written to {out}"
    else:
        kept = f"{out} keeps the last good checkpoint (step {saved})"
    return f"{what} at step {step} (lower the learning rate?); training stopped, {kept}"


def check_weights(model: nn.Module, step: int, out: Path | None, saved: int | None) -> None:
    """Never save (or hand back) NaN/Inf weights: the check before every checkpoint and at the end."""
    found = non_finite_tensors(model.state_dict())
    if found:
        raise NonFiniteLossError(
            stop_message(f"the weights became NaN/Inf ({describe(found)})", step, out, saved), step
        )


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
    sync_bn: bool = False,
) -> BEVFusion:
    """Train `model` for `train.steps` steps; checkpoints to `out_dir` every `train.checkpoint_every` steps.

    `after_step` runs after every optimizer step (fine-tuning uses it to keep pruning masks applied).
    `sync_bn` (distributed runs only) computes BatchNorm statistics over the global batch.
    A loss, gradient norm or weights that become NaN/Inf raise `NonFiniteLossError` naming the step;
    the last good checkpoint in `out_dir` (if any) stays, and no checkpoint with NaN/Inf weights is written.
    """
    torch.set_num_threads(train.threads)
    out = Path(out_dir) if out_dir is not None else None
    distributed = dist.is_distributed()
    if distributed:
        rank_indices(list(range(train.batch_size)))  # a batch that does not split fails before any work
        metadata = {**(metadata or {}), "distributed": {"world_size": dist.world(), "sync_bn": sync_bn}}
    resuming = resume and out is not None and (out / TRAIN_STATE_META).is_file()
    if resuming:
        check_resumable(out, train)
        load_into(model, read_weights(out), f"checkpoint {out}")
    home = next(model.parameters()).device
    net = ddp.wrap(model, sync_bn)  # the model itself in one process
    optimizer = make_optimizer(model, train)  # after pruning and wrapping: it holds the live parameters
    start = load_train_state(out, optimizer) if resuming else 0
    dist.check_same(start, "the step to resume from")
    normaliser = loss_normaliser()
    grid = model.config.grid
    target = dist.device()

    last_loss: list[float] = []
    saved: list[int | None] = [start if resuming else None]  # the step of the last good checkpoint in `out`

    def checkpoint(step: int) -> None:
        check_weights(model, step, out, saved[0])
        if out is None:
            return
        meta = {**(metadata or {}), "step": step, "train": train.__dict__}
        if last_loss:
            meta["last_loss"] = last_loss[-1]
        dist.on_main(lambda: save_checkpoint(out, model, meta, train_state=train_state(optimizer, step)))
        saved[0] = step

    net.train()
    bar = progress_bar(range(start, train.steps), desc=desc, enabled=progress, initial=start, total=train.steps)
    completed = False
    try:
        for step in bar:
            indices = rank_indices(batch_indices(len(dataset), train.batch_size, train.seed, step))
            batch = collate([dataset[i] for i in indices])
            if distributed:
                batch = ddp.to_device(batch, target)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, train)
            # The one loss of either head (CenterPoint's or TransFusion's), as pruning and fine-tuning use.
            loss, parts = detection_loss(net(**model_inputs(batch)), batch, grid, normaliser)
            # Distributed: the global batch's loss, the same on every rank, so that all stop together.
            loss_value = float(ddp.mean_over_ranks(loss.detach()))
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    stop_message(f"the loss became {loss_value}", step + 1, out, saved[0]), step + 1
                )
            last_loss[:] = [loss_value]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0))  # all-reduced: same on every rank
            if not math.isfinite(norm):
                raise NonFiniteLossError(
                    stop_message(f"the gradient norm became {norm}", step + 1, out, saved[0]), step + 1
                )
            optimizer.step()
            if after_step is not None:
                after_step(model)
            bar.set_postfix(loss=f"{last_loss[0]:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()}, refresh=False)
            if (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
                checkpoint(step + 1)
        checkpoint(train.steps)
        completed = True
    finally:
        bar.close()
        ddp.release(model, home, completed)
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
