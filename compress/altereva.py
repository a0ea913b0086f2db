"""AlterEva (AlterMOMA, NeurIPS 2024): importance from alternating modality masking.

Per parameter we record *signed saliencies* theta * dL/dtheta, because a channel's score is the
magnitude of the SUM of its coupled weights' saliencies (the gradient of a mask on that channel):
summing must happen before the absolute value. This module produces those signed tensors; `scores`
turns them into per-weight or per-channel importance.

    DeCI  = theta_0 * g(theta_0)                        on the unmasked model
    round "lidar masked":  s0 = theta_0 * g0,  then B reactivation steps,  sB = theta_0 * gB
    ReRI  = s0 - sB          (reload theta_0 bit for bit, then the same with the camera masked)

Two estimators of gB (`reri_data`). "paper" (Eq. 10 as printed): g0 on the scoring set D at theta_0,
gB on the last reactivation batch D_B at theta_B. Part of that difference is only the change of
data, so every round also records the zero-step NOISE FLOOR theta_0 * (g(D, theta_0) - g(D_B,
theta_0)) (one extra backward on D_B at theta_0): what ReRI would be had reactivation changed
nothing. "same": gB on D at theta_B, so only the parameter change remains and the floor is exactly
zero by construction. `reri_summary` turns signal (|ReRI|) and floor into a per-partition
signal-to-noise report, so a user sees whether reactivation said anything.

Gradients are taken in eval mode (BatchNorm as the fixed affine map that pruning removes), which
also makes scoring deterministic and independent of how the scoring set is batched.

Under torchrun the scoring set's batches are shared out (each rank a contiguous block) and the
gradient sums all-reduced, so N processes produce one process's scores up to summation order. A
reactivation step is different: it is ONE batch whose loss need not decompose over samples (the
reference loss divides by the batch's count of objects), so splitting it would change the result.
Every rank therefore runs the B steps itself on the whole batch: exact, and no slower than one
process doing them (the scores are then broadcast from rank 0, see `compress.oneshot`).

Everything here computes in the model's own dtype. The pruning harness hands it a float64 copy
(`compress.scores.in_float64`): in float32 the reactivation steps turned summation-order noise into
other scores (the camera-masked ReRI of the shipped tiny model moved by up to 37% between 1 and 2
threads, and by 22% of its total against float64): the reactivation trajectory itself diverges (with
SGD and the camera masked, the 8th step's loss was 2.009 in float32 and 1.801 in float64).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from common import dist
from common.progress import progress_bar
from common.task import Task
from compress.partition import Partition, PartitionError, masked_modality
from compress.scores import NORMALISE, PENALTIES

Batch = object  # whatever the task's `inputs` and `loss` take
Saliency = dict[str, torch.Tensor]  # parameter name -> signed theta * grad, same shape as the parameter


RERI_DATA = ("paper", "same")
REACTIVATION_OPTIMIZERS = ("sgd", "adamw")


@dataclass
class AlterEvaConfig:
    """AlterEva's options; the defaults are the shipped behaviour.

    The defaults are protocol v2's choice (reports/protocol-v2/PROTOCOL.md, issue 25): the paper's form with
    plain SGD and the zero-step noise floor taken off each unit's penalty ("altereva-denoised"), the one
    candidate that passed the mechanism gate with the best development score on bevfusion-tiny.

    reri_data: "paper" (g0 on D at theta_0, gB on D_B at theta_B: Eq. 10 as printed) or "same" (g0
    and gB both on D: only the parameter change remains). reactivation_optimizer: "sgd" (plain SGD, what
    the paper's description suggests) or "adamw" (the reference training optimiser, torch's default weight
    decay 0.01; protocol v1's choice, which fails protocol v2's planted-copy gate), both at
    `reactivation_lr`. reactivation_steps = 0 is the zero-step control: "paper" then scores pure
    batch-to-batch noise, "same" gives ReRI = 0 (AlterEva = DeCI = SNIP).

    Ours, not the paper's (issue 25; each aimed at a mechanism measured in docs/method_comparison.md):
    penalty "residual" keeps only the part of ReRI its DeCI does not predict (ReRI ranked like DeCI, so the
    penalty fell on the top contributors); "signed" penalises only units that reactivation GREW toward what
    the loss asked of them while the other modality was masked (|ReRI| also counts units it turned down); normalise "masked-loss" sizes
    each partition's share by the loss increase when it is masked (equal shares kept a redundant camera);
    restarts > 1 averages the reactivated gradient over that many restarts from theta_0, each with the
    scoring batches in another rotation (the camera's ReRI stood 1.6-1.9x above its noise floor);
    subtract_noise takes the zero-step noise floor off every unit's penalty (per weight for unstructured
    pruning, where single weights' ReRI is mostly noise); with reri_data "same" that floor is exactly 0,
    so there is nothing to take off.
    """

    reactivation_steps: int = 8  # B
    reactivation_lr: float = 1e-3  # shared by both optimisers
    reactivation_optimizer: str = "sgd"  # or "adamw" (protocol v1's choice; v2 chose sgd + subtract_noise)
    reri_data: str = "paper"  # or "same"
    alpha: float = 1.0
    beta: float = 1.0
    mask_mode: str = "parameters"  # or "feature" (ablation)
    floor: float | None = 1e-3  # ReRI discounts DeCI to no less than floor x DeCI; None: Eq. 13 as printed
    normalise: str = "partition"  # Eq. 11-13's shares per partition, "model": one total, or "masked-loss"
    penalty: str = "reri"  # "reri" (Eq. 10-13), "residual" or "signed" (ours)
    restarts: int = 1  # reactivation restarts averaged (ours; 1 = the paper)
    subtract_noise: bool = True  # take the zero-step noise floor off each unit's penalty (ours; chosen by protocol v2)
    # ours (issue 27): add this much of each unit's contribution share while the OTHER sensor is masked, so a
    # unit that carries the model when a sensor fails is not scored redundant (0 = AlterEva as published)
    failure_weight: float = 0.0

    def differences(self, recorded: dict) -> dict[str, tuple]:
        """Option -> (recorded, this config's) where a recorded request (as `dataclasses.asdict` wrote it)
        differs; options the record predates are not compared (each was added with its neutral value as the
        default), so a run made before an option existed still matches."""
        now = dataclasses.asdict(self)
        return {k: (v, now[k]) for k, v in recorded.items() if k in now and v != now[k]}

    def validate(self) -> AlterEvaConfig:
        """One clear ValueError per bad option, before any gradient is taken."""
        if self.reri_data not in RERI_DATA:
            raise ValueError(f"unknown reri_data {self.reri_data!r} (choose from {', '.join(RERI_DATA)})")
        if self.reactivation_optimizer not in REACTIVATION_OPTIMIZERS:
            choices = ", ".join(REACTIVATION_OPTIMIZERS)
            raise ValueError(f"unknown reactivation_optimizer {self.reactivation_optimizer!r} (choose from {choices})")
        if self.normalise not in NORMALISE:
            raise ValueError(f"unknown normalise {self.normalise!r} (choose from {', '.join(NORMALISE)})")
        steps = self.reactivation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"reactivation_steps must be a whole number >= 0, got {steps!r}")
        if not self.reactivation_lr > 0:
            raise ValueError(f"reactivation_lr must be > 0, got {self.reactivation_lr}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {self.penalty!r} (choose from {', '.join(PENALTIES)})")
        restarts = self.restarts
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be a whole number >= 1, got {restarts!r}")
        if not (isinstance(self.failure_weight, int | float) and self.failure_weight >= 0):
            raise ValueError(f"failure_weight must be a number >= 0, got {self.failure_weight!r}")
        return self


@dataclass
class AlterEvaSaliency:
    deci: Saliency
    reri: dict[str, Saliency] = field(default_factory=dict)  # "lidar" / "camera": the modality that was masked
    # Zero-step noise floor per round, theta_0 * (g(D, theta_0) - g(D_B, theta_0)); None where it is exactly
    # zero by construction (reri_data "same").
    noise: dict[str, Saliency | None] = field(default_factory=dict)
    noise_seconds: float = 0.0  # what the floor cost: the extra backward passes on D_B at theta_0
    # failure_weight > 0 only: per round, DeCI with that modality masked (theta_0 * g on D): what each unit of the
    # other sensor contributes while the masked one has failed
    masked_deci: dict[str, Saliency] = field(default_factory=dict)
    # normalise "masked-loss" only: the scoring set's mean loss with nothing, "camera", "lidar" or "both" masked
    masked_loss: dict[str, float] = field(default_factory=dict)
    # per round, the scoring set's mean loss with that modality masked at theta_0 ("before") and after the B
    # reactivation steps ("after", averaged over restarts): reactivation is meant to LOWER it; where it rises
    # the steps diverged, and ReRI measures the divergence (lower reactivation_lr)
    reactivation_loss: dict[str, dict[str, float]] = field(default_factory=dict)


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


def reactivate(
    model: nn.Module, task: Task, frozen: set[str], batches: list[Batch], steps: int, lr: float, optimizer: str = "sgd"
) -> None:
    """B steps (plain SGD or AdamW) on D_1..D_B (cycling through `batches`), masked parameters held fixed."""
    trainable = [p for name, p in model.named_parameters() if name not in frozen]
    optimizer = torch.optim.AdamW(trainable, lr=lr) if optimizer == "adamw" else torch.optim.SGD(trainable, lr=lr)
    model.eval()
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        task.loss_of(task.forward(model, batch), batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def mean_loss(model: nn.Module, task: Task, batches: list[Batch]) -> float:
    """The task loss averaged over `batches` (no gradients; shared out and summed under torchrun)."""
    model.eval()
    total = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for index in dist.shard_range(len(batches)):
            batch = batches[index]
            total += float(task.loss_of(task.forward(model, batch), batch)) / len(batches)
    dist.all_reduce_sum_([total])
    return float(total)


def masked_losses(model: nn.Module, task: Task, partition: Partition, batches: list[Batch], mode: str) -> dict:
    """Mean loss with nothing, the camera, the LiDAR and both masked: what each partition is worth to the
    loss (normalise "masked-loss"). Fusion + heads are what both sensors go through, so their worth is
    the loss increase with both masked."""
    losses = {"none": mean_loss(model, task, batches)}
    for masked in ("camera", "lidar"):
        with masked_modality(model, partition, masked, mode):
            losses[masked] = mean_loss(model, task, batches)
    with masked_modality(model, partition, "camera", mode), masked_modality(model, partition, "lidar", mode):
        losses["both"] = mean_loss(model, task, batches)
    return losses


def reactivation_diverged(masked: str, loss: dict[str, float], config: AlterEvaConfig) -> str:
    """The warning when reactivation raised the masked loss it is meant to lower."""
    return (
        f"AlterEva's reactivation with the {masked} masked raised the scoring set's loss from {loss['before']:.4g} "
        f"to {loss['after']:.4g} ({config.reactivation_optimizer}, lr {config.reactivation_lr:g}, "
        f"{config.reactivation_steps} steps): ReRI then measures a divergence, not a reactivation; try a lower "
        "--reactivation-lr, and AdamW (--reactivation-optimizer adamw) where plain SGD keeps raising it"
    )


def _mean_saliency(saliencies: list[Saliency]) -> Saliency:
    """Element-wise mean in a fixed order (one saliency: itself, bit for bit)."""
    if len(saliencies) == 1:
        return saliencies[0]
    return {name: sum(s[name] for s in saliencies) / len(saliencies) for name in saliencies[0]}


def _reset_trainable(model: nn.Module, params0: dict[str, torch.Tensor], frozen: set[str]) -> None:
    """Every parameter reactivation may move back to theta_0; the masked (frozen) ones stay masked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in frozen:
                p.copy_(params0[name])


def altereva_saliency(
    model: nn.Module, task: Task, batches: list[Batch], config: AlterEvaConfig, progress: bool = True
) -> AlterEvaSaliency:
    """DeCI, both ReRI rounds and their zero-step noise floors. The model's parameters and buffers are
    bit-identical afterwards.

    With `restarts` R > 1 each round reactivates R times from theta_0, restart r with the scoring batches
    rotated by r (so D_1..D_B and, in the paper form, D_B differ), and averages the end-point saliency; the
    noise floor is then the same average taken at theta_0."""
    config.validate()
    partition = Partition.of(model, task.partition)
    if not (partition.has("camera") and partition.has("lidar")):
        raise PartitionError("AlterEva needs a fusion model with both a camera and a LiDAR partition")
    if config.restarts > len(batches):
        raise ValueError(
            f"{config.restarts} reactivation restarts need at least as many scoring batches (got {len(batches)}): "
            "more would repeat a batch order"
        )
    theta0 = {name: t.detach().clone() for name, t in model.state_dict().items()}
    params0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    bar = progress_bar(total=1 + 2 * (1 + config.restarts), desc="AlterEva", enabled=progress, leave=False)
    steps, lr = config.reactivation_steps, config.reactivation_lr
    try:
        result = AlterEvaSaliency(deci=signed_saliency(model, task, batches))
        if config.normalise == "masked-loss":
            result.masked_loss = masked_losses(model, task, partition, batches, config.mask_mode)
        bar.update()
        for masked in ("lidar", "camera"):
            with masked_modality(model, partition, masked, config.mask_mode):
                s0 = signed_saliency(model, task, batches, theta=params0)
                if config.failure_weight > 0:
                    result.masked_deci[masked] = s0
                bar.update()
                frozen = set(partition.parameters(model, masked))
                ends, floors, after = [], [], []
                before = mean_loss(model, task, batches) if steps > 0 else None
                for restart in range(config.restarts):
                    order = batches[restart:] + batches[:restart]
                    last = [order[(steps - 1) % len(order)]]  # D_B (with B = 0: the order's last batch)
                    if config.reri_data == "paper":  # the floor: the same estimator had reactivation changed nothing
                        start = time.perf_counter()
                        floors.append(signed_saliency(model, task, last, theta=params0))
                        result.noise_seconds += time.perf_counter() - start
                    reactivate(model, task, frozen, order, steps, lr, config.reactivation_optimizer)
                    if before is not None:
                        after.append(mean_loss(model, task, batches))
                    ends.append(signed_saliency(model, task, last if config.reri_data == "paper" else batches, params0))
                    _reset_trainable(model, params0, frozen)
                    bar.update()
                if before is not None:
                    loss = {"before": before, "after": math.fsum(after) / len(after)}
                    result.reactivation_loss[masked] = loss
                    if loss["after"] > loss["before"]:
                        warnings.warn(reactivation_diverged(masked, loss, config), stacklevel=2)
                s_b = _mean_saliency(ends)
                result.reri[masked] = {name: s0[name] - s_b[name] for name in s0}
                result.noise[masked] = None
                if floors:
                    floor0 = _mean_saliency(floors)
                    result.noise[masked] = {name: s0[name] - floor0[name] for name in s0}
            model.load_state_dict(theta0)  # reload theta_0 exactly before the next round
    finally:
        model.load_state_dict(theta0)
        bar.close()
    return result


Units = list[torch.Tensor]  # one tensor per group (channels) or per weight tensor, as the scores use them
ROUND_PARTS = {"lidar": ("camera", "fusion"), "camera": ("lidar", "fusion")}  # masked -> partitions it scores
SAME_DATA_NOTE = "same-data ReRI: the zero-step floor is exactly 0 by construction (SNR undefined)"


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rho (average ranks for ties); None when either side is constant or has < 2 units."""
    if a.numel() < 2:
        return None
    ranks = [_average_ranks(x.double().flatten()) for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else None


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]  # 1-based mean rank of each tie block


def reri_summary(
    reri: dict[str, Units],
    noise: dict[str, Units | None],
    parts: list[str],
    config: AlterEvaConfig,
    units: str,
    deci: Units | None = None,
) -> dict:
    """Signal (sum |ReRI|), zero-step noise floor (sum |floor|), their ratio and their rank agreement,
    per round (the masked modality) and per partition that round scores.

    `reri` and `noise` hold per-unit magnitudes (`units`: "channels" or "weights") in the layout of
    `parts`. An SNR near 1 or a Spearman rho near 1 says the ranking is mostly batch-to-batch noise.
    With `deci`, "deci_spearman" is the rank agreement of ReRI with DeCI: near 1, the penalty mostly takes
    from the units that contribute most, whatever reactivation says about redundancy.
    """
    rounds = {}
    for masked, signal_units in reri.items():
        per_part = {}
        for part in ROUND_PARTS[masked]:
            chosen = [i for i, p in enumerate(parts) if p == part]
            if not chosen:
                continue
            signal_flat = torch.cat([signal_units[i].double().flatten() for i in chosen])
            signal = float(signal_flat.sum())
            against_deci = {}
            if deci is not None:
                deci_flat = torch.cat([deci[i].double().flatten() for i in chosen])
                against_deci["deci_spearman"] = rank_correlation(signal_flat, deci_flat)
            if noise.get(masked) is None:
                per_part[part] = {"signal": signal, "noise": 0.0, "snr": None, "spearman": None, **against_deci}
                continue
            noise_flat = torch.cat([noise[masked][i].double().flatten() for i in chosen])
            floor = float(noise_flat.sum())
            snr = signal / floor if floor > 0 else None
            per_part[part] = {
                "signal": signal,
                "noise": floor,
                "snr": snr,
                "spearman": rank_correlation(signal_flat, noise_flat),
                **against_deci,
            }
        rounds[masked] = per_part
    summary = {
        "reri_data": config.reri_data,
        "optimizer": config.reactivation_optimizer,
        "steps": config.reactivation_steps,
        "lr": config.reactivation_lr,
        "normalise": config.normalise,
        "units": units,
        "rounds": rounds,
    }
    if config.reri_data == "same":
        summary["note"] = SAME_DATA_NOTE
    return summary


def reri_line(summary: dict) -> str:
    """One line for the CLI: signal/noise = SNR (Spearman rho) per round and partition."""
    head = f"ReRI signal/noise ({summary['reri_data']} data, {summary['optimizer']}, B={summary['steps']})"
    items = []
    for masked, per_part in summary["rounds"].items():
        for part, r in per_part.items():
            if r["snr"] is None and r["noise"] == 0.0:
                items.append(f"{part}|{masked} masked {r['signal']:.3g}/0")
                continue
            snr = "inf" if r["snr"] is None else f"{r['snr']:.2f}"
            rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.2f}"
            items.append(f"{part}|{masked} masked {r['signal']:.3g}/{r['noise']:.3g} = {snr} (rho {rho})")
    tail = " [floor 0 by construction]" if summary["reri_data"] == "same" else ""
    return f"{head}: " + "; ".join(items) + tail
