"""Training under DistributedDataParallel, shared by the generic fine-tune loop and the reference trainer.

The order is the one Torch-Pruning's and ModelOpt's recipes use, and it matters: prune the plain
model first (every rank the same channels), then move it to the rank's device, optionally turn its
BatchNorms into synchronised ones, wrap it in DDP, and only then build the optimizer (an optimizer
built before pruning keeps references to removed parameters). `release` undoes the wrapping: plain
BatchNorms, the model back where it was (the CPU, where the rest of the toolkit works).

torch's `SyncBatchNorm` runs on GPUs only; on the CPU (gloo) `GlobalBatchNorm` computes the same
statistics over the global batch with differentiable all-reduces, so N ranks x B/N samples train
exactly like one process with B samples (up to summation order).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common import dist as cdist

_ORIGINAL = "_altermoma_original_class"


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's output depends on every rank's input, so the
    gradient of an input is the sum over ranks of the output's gradients (another all-reduce)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x)


class _GlobalNorm:
    """Training-mode batch statistics over every rank's samples (a mixin over BatchNorm{1,2,3}d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and cdist.is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # One all-reduce forward (and one backward) per layer: sums and sums of squares in float64,
        # where E[x^2] - E[x]^2 loses nothing that matters to float32 activations.
        wide = x.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        total = differentiable_all_reduce(torch.cat([wide.sum(dims), wide.pow(2).sum(dims), count]))
        n = float(total[-1].detach())
        mean, square = total[: x.shape[1]] / n, total[x.shape[1] : -1] / n
        var = (square - mean * mean).clamp(min=0.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / max(n - 1.0, 1.0))
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """The update `nn.BatchNorm` makes, with the global batch's mean and unbiased variance."""
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)


class GlobalBatchNorm1d(_GlobalNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalNorm, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalNorm, nn.BatchNorm3d):
    pass


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def sync_batchnorm(model: nn.Module) -> int:
    """Make every plain BatchNorm synchronise its statistics across ranks; returns how many.

    In place, by class swap: parameters and buffers stay the same objects (an optimizer built on them
    stays valid) and `release` swaps back. GPU: torch's `SyncBatchNorm`; CPU: `GlobalBatchNorm*d`.
    """
    on_gpu = next(model.parameters()).is_cuda
    count = 0
    for m in model.modules():
        if type(m) not in _GLOBAL:
            continue
        setattr(m, _ORIGINAL, type(m))
        if on_gpu:
            m.__class__ = nn.SyncBatchNorm
            m.process_group = None
        else:
            m.__class__ = _GLOBAL[type(m)]
        count += 1
    return count


def plain_batchnorm(model: nn.Module) -> None:
    """Undo `sync_batchnorm`."""
    for m in model.modules():
        original = m.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            m.__class__ = original
            m.__dict__.pop("process_group", None)


def wrap(model: nn.Module, sync_bn: bool = False, find_unused_parameters: bool = False) -> nn.Module:
    """The module to train: `model` itself in one process; in a distributed run, `model` moved to the
    rank's device and wrapped in DDP (which broadcasts rank 0's weights, so every rank starts equal).

    Build the optimizer on `model.parameters()` AFTER this call (DDP keeps the same parameter objects).
    """
    if not cdist.is_distributed():
        return model
    target = cdist.device()
    model.to(target)
    if sync_bn:
        sync_batchnorm(model)
    ids = [target.index] if target.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def release(model: nn.Module, home: torch.device | str, completed: bool = True) -> nn.Module:
    """After training: rank 0's buffers on every rank (without sync BN each rank's BatchNorm statistics
    saw only its slice; rank 0's are the ones saved), plain BatchNorms again and the model back on
    `home`, the device it came from. No-ops in one process.

    `completed=False` (training raised) skips the broadcast: the other ranks may be waiting in another
    collective, and this rank must exit, not wait for them."""
    if cdist.is_distributed():
        if completed:
            cdist.broadcast_(list(model.buffers()))
        plain_batchnorm(model)
        model.to(home)
    return model


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors of a batch (nested dicts, lists, tuples) moved to `device`; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value


def split_batch(batch: Any, rank: int, world: int) -> Any:
    """This rank's share of a global batch: every tensor cut along dim 0 into `world` equal slices (as
    DataParallel scatters), anything else replicated. Unequal slices are refused: with a loss that
    averages over samples, equal slices make the DDP-averaged gradient the global batch's gradient."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] % world:
            raise ValueError(
                f"a batch of {batch.shape[0]} does not split evenly over {world} processes "
                "(make the batch size a multiple of the number of processes)"
            )
        size = batch.shape[0] // world
        return batch[rank * size : (rank + 1) * size]
    if isinstance(batch, dict):
        return {k: split_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(split_batch(v, rank, world) for v in batch)
    return batch


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The average over ranks of a detached tensor (the global loss for logs); itself in one process."""
    if not cdist.is_distributed():
        return values
    total = values.detach().clone()
    cdist.all_reduce_sum_(total)
    return total / dist.get_world_size()
