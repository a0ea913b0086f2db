"""AlterEva (AlterMOMA, NeurIPS 2024): importance from alternating modality masking.

Per parameter we record *signed saliencies* theta * dL/dtheta, because a channel's score is the
magnitude of the SUM of its coupled weights' saliencies (the gradient of a mask on that channel):
summing must happen before the absolute value. This module produces those signed tensors; `scores`
turns them into per-weight or per-channel importance.

    DeCI  = theta_0 * g(theta_0)                        on the unmasked model
    round "lidar masked":  s0 = theta_0 * g0,  then B reactivation SGD steps,  sB = theta_0 * gB
    ReRI  = s0 - sB          (reload theta_0 bit for bit, then the same with the camera masked)

Gradients are taken in eval mode (BatchNorm as the fixed affine map that pruning removes), which
also makes scoring deterministic and independent of how the scoring set is batched.

Under torchrun the scoring set's batches are shared out (each rank a contiguous block) and the
gradient sums all-reduced, so N processes produce one process's scores up to summation order. A
reactivation step is different: it is ONE batch whose loss need not decompose over samples (the
reference loss divides by the batch's count of objects), so splitting it would change the result.
Every rank therefore runs the B steps itself on the whole batch: exact, and no slower than one
process doing them (the scores are then broadcast from rank 0, see `compress.oneshot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from common import dist
from common.progress import progress_bar
from common.task import Task
from compress.partition import Partition, PartitionError, masked_modality

Batch = object  # whatever the task's `inputs` and `loss` take
Saliency = dict[str, torch.Tensor]  # parameter name -> signed theta * grad, same shape as the parameter


@dataclass
class AlterEvaConfig:
    reactivation_steps: int = 8  # B
    reactivation_lr: float = 1e-3  # plain SGD
    alpha: float = 1.0
    beta: float = 1.0
    mask_mode: str = "parameters"  # or "feature" (ablation)
    floor: float | None = 1e-3  # ReRI discounts DeCI to no less than floor x DeCI; None: Eq. 13 as printed


@dataclass
class AlterEvaSaliency:
    deci: Saliency
    reri: dict[str, Saliency] = field(default_factory=dict)  # "lidar" / "camera": the modality that was masked


def loss_gradients(model: nn.Module, task: Task, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Mean gradient of the task loss over `batches`, for every parameter.

    Distributed: each rank backpropagates its block of `batches` and the sums are all-reduced.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    for index in dist.shard_range(len(batches)):
        batch = batches[index]
        loss = task.loss_of(task.forward(model, batch), batch)
        (loss / len(batches)).backward()
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    model.zero_grad(set_to_none=True)
    dist.all_reduce_sum_(list(grads.values()))
    return grads


def signed_saliency(
    model: nn.Module, task: Task, batches: list[Batch], theta: dict[str, torch.Tensor] | None = None
) -> Saliency:
    """theta * dL/dtheta at the model's current parameters; `theta` overrides the multiplier."""
    grads = loss_gradients(model, task, batches)
    params = dict(model.named_parameters())
    return {name: (theta[name] if theta is not None else params[name].detach()) * g for name, g in grads.items()}


def reactivate(model: nn.Module, task: Task, frozen: set[str], batches: list[Batch], steps: int, lr: float) -> None:
    """B plain-SGD steps on D_1..D_B (cycling through `batches`), masked parameters held fixed."""
    trainable = [p for name, p in model.named_parameters() if name not in frozen]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    model.eval()
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        task.loss_of(task.forward(model, batch), batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def altereva_saliency(
    model: nn.Module, task: Task, batches: list[Batch], config: AlterEvaConfig, progress: bool = True
) -> AlterEvaSaliency:
    """DeCI and both ReRI rounds. The model's parameters and buffers are bit-identical afterwards."""
    partition = Partition.of(model, task.partition)
    if not (partition.has("camera") and partition.has("lidar")):
        raise PartitionError("AlterEva needs a fusion model with both a camera and a LiDAR partition")
    if config.reactivation_steps < 1:
        raise ValueError(f"reactivation_steps must be >= 1, got {config.reactivation_steps}")
    theta0 = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    bar = progress_bar(total=5, desc="AlterEva", enabled=progress, leave=False)
    try:
        result = AlterEvaSaliency(deci=signed_saliency(model, task, batches))
        bar.update()
        for masked in ("lidar", "camera"):
            with masked_modality(model, partition, masked, config.mask_mode):
                s0 = signed_saliency(model, task, batches, theta=params0)
                frozen = set(partition.parameters(model, masked))
                reactivate(model, task, frozen, batches, config.reactivation_steps, config.reactivation_lr)
                last = batches[(config.reactivation_steps - 1) % len(batches)]
                s_b = signed_saliency(model, task, [last], theta=params0)
                result.reri[masked] = {name: s0[name] - s_b[name] for name in s0}
            model.load_state_dict(theta0)  # reload theta_0 exactly before the next round
            bar.update(2)
    finally:
        model.load_state_dict(theta0)
        bar.close()
    return result
