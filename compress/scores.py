"""Importance scores per unit (a channel or a weight), from signed saliencies.

AlterEva's combination (paper Eq. 13), normalised within each partition:
    camera:  S = alpha * DeCI/sum(DeCI) - beta * ReRI_lidar-masked / sum(...)
    lidar:   S = alpha * DeCI/sum(DeCI) - beta * ReRI_camera-masked / sum(...)
    fusion:  S = alpha * DeCI/sum(DeCI) - beta/2 * (both ReRI terms, each normalised)

One departure from Eq. 13 as printed, on by default: ReRI may discount a unit's DeCI share down to
`floor` times that share, never below it. Printed Eq. 13 lets a live unit whose reactivation share
exceeds its contribution share go negative, i.e. rank BELOW a unit that contributes nothing (DeCI =
ReRI = 0 gives S = 0), so live channels were pruned before dead ones. The floor keeps dead units last
and orders the heavily reactivated ones by their contribution. Measured on the tiny fusion model at
50% GFLOPs, 100 fine-tune steps: mAP 0.735 (printed), 0.783 (floor 0, ties by magnitude), 0.811
(floor 1e-3); `altermoma compare` keeps the printed form as the `altereva-eq13` row.

`normalise="model"` (an option, not the paper) divides every saliency by its total over the whole model
instead of per partition. Eq. 11-13 give every partition shares summing to alpha whatever its size or its
gradient scale, which decides how much of each backbone survives before ReRI says anything; over the whole
model the partitions compete in the loss's own units, as SNIP's do.

The gradient passes behind these scores run in float64 (`in_float64`): on the CPU a float32 sum's
order depends on the thread count, AlterEva's reactivation steps amplify that noise (up to 37% of a
unit's ReRI between 1 and 2 threads on the shipped tiny model), and a different selection followed.
In float64 the same noise sits ~1e-16 relative, far below any gap between two channels' scores.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
SCORING_DTYPE = torch.float64

Units = list[torch.Tensor]  # one tensor of unit scores per group (structured) or per parameter (unstructured)


def normalise_within_partitions(values: Units, parts: list[str]) -> Units:
    """Divide every unit by the total of its partition (0 stays 0 when a partition's total is 0).

    The totals are exactly rounded sums (`math.fsum`), so they do not depend on the order torch's
    threads would have added the values in."""
    members: dict[str, list[float]] = {}
    for v, part in zip(values, parts):
        members.setdefault(part, []).extend(v.detach().double().flatten().tolist())
    totals = {part: math.fsum(numbers) for part, numbers in members.items()}
    return [v / totals[part] if totals[part] > 0 else torch.zeros_like(v) for v, part in zip(values, parts)]


NORMALISE = ("partition", "model", "masked-loss")


def _share_groups(parts: list[str], normalise: str) -> list[str]:
    """The group whose total each unit is divided by: its partition, or one group for the whole model."""
    if normalise not in NORMALISE:
        raise ValueError(f"unknown normalise {normalise!r} (choose from {', '.join(NORMALISE)})")
    return ["model"] * len(parts) if normalise == "model" else parts


def masked_loss_budgets(masked_loss: Mapping[str, float]) -> dict[str, float]:
    """Each partition's share of the scores (normalise "masked-loss", ours): the loss increase when it is
    masked (fusion + heads: both sensors masked), over the sum of the three. Equal shares (Eq. 11-13) give a
    partition the model can do without as much as one it cannot; these follow what masking it costs."""
    base = masked_loss["none"]
    rise = {"camera": masked_loss["camera"], "lidar": masked_loss["lidar"], "fusion": masked_loss["both"]}
    rise = {part: max(value - base, 0.0) for part, value in rise.items()}
    total = math.fsum(rise.values())
    if not total > 0:
        raise ValueError("masking the camera, the LiDAR or both does not raise the loss: no budget to share out")
    return {part: value / total for part, value in rise.items()}


PENALTIES = ("reri", "residual", "signed")


def reri_residual(reri: Units, deci: Units, parts: list[str]) -> Units:
    """ReRI less what DeCI predicts of it (penalty "residual", ours): per partition, log ReRI is fitted
    on log DeCI by least squares over the units where both are positive, and only the excess of a unit's
    ReRI over the fit is kept (zero below it). Where ReRI ranks like DeCI, plain ReRI penalises the top
    contributors; this penalises a unit only for reactivation beyond what its contribution explains."""
    result = [torch.zeros_like(r, dtype=torch.float64) for r in reri]
    for part in dict.fromkeys(parts):
        chosen = [i for i, p in enumerate(parts) if p == part]
        r = torch.cat([reri[i].double().flatten() for i in chosen])
        d = torch.cat([deci[i].double().flatten() for i in chosen])
        live = (r > 0) & (d > 0)
        if int(live.sum()) < 2:
            continue
        x, y = d[live].log().numpy(), r[live].log().numpy()
        x_mean, y_mean = math.fsum(x) / len(x), math.fsum(y) / len(y)
        spread = math.fsum((x - x_mean) ** 2)
        slope = math.fsum((x - x_mean) * (y - y_mean)) / spread if spread > 0 else 0.0
        intercept = y_mean - slope * x_mean
        for i in chosen:
            d_i = deci[i].double()
            predicted = torch.where(d_i > 0, torch.exp(intercept + slope * d_i.clamp_min(1e-300).log()), 0.0)
            result[i] = (reri[i].double() - predicted).clamp_min(0.0)
    return result


def penalty_units(
    penalty: str,
    reri: dict[str, Units],
    deci: Units,
    parts: list[str],
    signed: dict[str, Units] | None = None,
    noise: dict[str, Units | None] | None = None,
) -> dict[str, Units]:
    """Per masked modality, the penalty of every unit: |ReRI| ("reri", Eq. 10), its excess over what DeCI
    predicts ("residual"), or only where reactivation grew the unit ("signed", ours: `signed` holds ReRI
    per unit before the absolute value, S_0 - S_B with S the loss gradient of a mask on the unit; a unit the
    masked loss pushed up and reactivation then gave more has S_B > S_0, a unit it turned down the opposite).
    With `noise` (|zero-step floor| per unit), the floor is taken off every penalty, zero below it."""
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r} (choose from {', '.join(PENALTIES)})")
    result = {}
    for masked, values in reri.items():
        if penalty == "residual":
            values = reri_residual(values, deci, parts)
        elif penalty == "signed":
            values = [(-v.double()).clamp_min(0.0) for v in signed[masked]]
        floor = (noise or {}).get(masked)
        if floor is not None:
            values = [(v.double() - f.double()).clamp_min(0.0) for v, f in zip(values, floor)]
        result[masked] = values
    return result


def altereva_scores(
    deci: Units,
    reri: dict[str, Units],
    parts: list[str],
    alpha: float,
    beta: float,
    floor: float | None = 1e-3,
    normalise: str = "partition",
    budgets: Mapping[str, float] | None = None,
    failure: dict[str, Units] | None = None,
    failure_weight: float = 0.0,
) -> Units:
    """Combine |DeCI| and |ReRI| (per masked modality) into AlterEva scores; higher means keep.

    `floor=None` is Eq. 13 as printed; a number bounds every score below by `floor * alpha * DeCI share`.
    `normalise`: "partition" (Eq. 11-13), "model" (one total per saliency over every unit) or "masked-loss"
    (per partition, then each partition's shares scaled by its `budgets` entry: `masked_loss_budgets`).
    `failure` (ours, issue 27): per masked modality, each unit's |DeCI| with that modality masked; a camera
    unit gains `failure_weight` times its share with the LiDAR masked, a LiDAR unit with the camera masked,
    fusion the mean of both, so what carries the model through a sensor failure is not scored redundant.
    """
    deci_n = shares(deci, parts, normalise, budgets)
    reri_n = {masked: shares(v, parts, normalise, budgets) for masked, v in reri.items()}
    fail_n = None
    if failure and failure_weight > 0:
        fail_n = {masked: shares(v, parts, normalise, budgets) for masked, v in failure.items()}
    scores = []
    for i, part in enumerate(parts):
        score = alpha * deci_n[i] - beta * _round_of_other_sensor(reri_n, i, part)
        if fail_n is not None:
            score = score + failure_weight * _round_of_other_sensor(fail_n, i, part)
        scores.append(score if floor is None else torch.maximum(score, floor * alpha * deci_n[i]))
    return scores


def shares(values: Units, parts: list[str], normalise: str, budgets: Mapping[str, float] | None = None) -> Units:
    """Every unit as a share of its partition's total (or the model's, `normalise="model"`); with "masked-loss",
    each partition's shares then scaled by its budget (`masked_loss_budgets`)."""
    normalised = normalise_within_partitions(values, _share_groups(parts, normalise))
    if normalise != "masked-loss":
        return normalised
    if budgets is None:
        raise ValueError("normalise 'masked-loss' needs the partitions' budgets (masked_loss_budgets)")
    return [v * budgets[part] for v, part in zip(normalised, parts)]


def _round_of_other_sensor(per_round: dict[str, Units], i: int, part: str) -> torch.Tensor:
    """Unit i's value from the round that masked the OTHER sensor (camera units: the LiDAR-masked round, and
    the reverse); fusion units sit behind both, so they take the mean of both rounds (Eq. 13's beta/2 each)."""
    if part == "camera":
        return per_round["lidar"][i]
    if part == "lidar":
        return per_round["camera"][i]
    return 0.5 * (per_round["lidar"][i] + per_round["camera"][i])


def floored_fraction(
    deci: Units,
    reri: dict[str, Units],
    parts: list[str],
    alpha: float,
    beta: float,
    floor: float | None,
    normalise: str = "partition",
    budgets: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per partition, the fraction of units whose ReRI penalty reaches the floor (printed Eq. 13: goes
    below it), so that their rank no longer follows their contribution. A high fraction in a partition
    that holds most of the FLOPs decides where a GFLOPs target is met."""
    printed = altereva_scores(deci, reri, parts, alpha, beta, None, normalise, budgets)
    bound = floor if floor is not None else 0.0
    hit: dict[str, list[int]] = {}
    for score, share, part in zip(printed, shares(deci, parts, normalise, budgets), parts):
        counts = hit.setdefault(part, [0, 0])
        counts[0] += int(((score <= bound * alpha * share) & (share > 0)).sum())  # dead units are not overridden
        counts[1] += score.numel()
    return {part: n / total for part, (n, total) in hit.items() if total}


# ---- scoring precision ---------------------------------------------------------------------------
SETTLED_BITS = 24  # float32's significand: ~6e-8 relative, ~1e5 x the float64 passes' thread-to-thread noise


def settled(units: Units, bits: int = SETTLED_BITS) -> Units:
    """Every value rounded to `bits` significant bits (half to even), kept in float64 (no overflow).

    The float64 gradient passes still differ between thread counts in their last bits (measured on the
    shipped tiny model: up to 1.2e-13 relative per channel); rounded to 24 bits, the scores are the same
    numbers, bit for bit, with any thread count, so their digest can be compared and the selection cannot
    move. Values closer than ~6e-8 relative become ties, which the magnitude tie-break and then the
    position decide (on tiny-fusion the closest two channel scores are 2e-6 apart)."""
    result = []
    for v in units:
        v = v.detach().double()
        mantissa, exponent = torch.frexp(v)  # v = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
        rounded = torch.round(mantissa * 2.0**bits) * torch.pow(2.0, (exponent - bits).double())
        result.append(torch.where(torch.isfinite(v), rounded, v))
    return result


def to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating tensor cast to `dtype` (inside dicts, lists, tuples and dataclasses);
    integer tensors (indices, voxel positions) and everything else are kept as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: to_dtype(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_dtype(v, dtype) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(to_dtype(v, dtype) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: to_dtype(getattr(value, f.name), dtype) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


def float64_copies(model: nn.Module, batches: list, task: Any) -> tuple[nn.Module, list] | None:
    """A float64 copy of the model and of the batches, or None (warned) when the copy's forward and
    loss do not run in float64 (a model or batch type holding float32 tensors this cannot reach)."""
    net = copy.deepcopy(model).to(SCORING_DTYPE)
    data = [to_dtype(b, SCORING_DTYPE) for b in batches]
    was_training = net.training
    try:
        with torch.no_grad():
            task.loss_of(task.forward(net.eval(), data[0]), data[0])
    except (RuntimeError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"scoring in the model's own precision: its copy does not run in float64 ({reason}); "
            "the selection may then depend on the thread count",
            stacklevel=3,
        )
        return None
    net.train(was_training)
    return net, data


def in_float64(
    score: Callable[[nn.Module, list], T],
    model: nn.Module,
    batches: list,
    task: Any,
    record: dict | None = None,
    precision: str = "float64",
) -> T:
    """`score(model, batches)` run on float64 copies of both, so that a sum's order (the thread count,
    the ranks under torchrun) moves the result by ~1e-16 relative instead of ~1e-7. The model itself is
    never touched. Falls back to the originals, with a warning, for a model that cannot run in float64;
    `record["precision"]` then names the dtype used. `precision="model"` (PruneRequest.scoring_precision)
    skips the copy: the model's own dtype, for speed and memory where float64 is slow (most GPUs)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), SCORING_DTYPE)
    if precision == "model" or not batches:
        copies = None
    else:
        copies = (model, batches) if dtype == SCORING_DTYPE else float64_copies(model, batches, task)
    if record is not None:
        record["precision"] = str(SCORING_DTYPE if copies is not None else dtype).removeprefix("torch.")
    return score(*copies) if copies is not None else score(model, batches)
