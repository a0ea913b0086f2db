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
"""

from __future__ import annotations

import torch

Units = list[torch.Tensor]  # one tensor of unit scores per group (structured) or per parameter (unstructured)


def normalise_within_partitions(values: Units, parts: list[str]) -> Units:
    """Divide every unit by the total of its partition (0 stays 0 when a partition's total is 0)."""
    totals: dict[str, float] = {}
    for v, part in zip(values, parts):
        totals[part] = totals.get(part, 0.0) + float(v.sum())
    return [v / totals[part] if totals[part] > 0 else torch.zeros_like(v) for v, part in zip(values, parts)]


NORMALISE = ("partition", "model")


def _share_groups(parts: list[str], normalise: str) -> list[str]:
    """The group whose total each unit is divided by: its partition, or one group for the whole model."""
    if normalise not in NORMALISE:
        raise ValueError(f"unknown normalise {normalise!r} (choose from {', '.join(NORMALISE)})")
    return parts if normalise == "partition" else ["model"] * len(parts)


def altereva_scores(
    deci: Units,
    reri: dict[str, Units],
    parts: list[str],
    alpha: float,
    beta: float,
    floor: float | None = 1e-3,
    normalise: str = "partition",
) -> Units:
    """Combine |DeCI| and |ReRI| (per masked modality) into AlterEva scores; higher means keep.

    `floor=None` is Eq. 13 as printed; a number bounds every score below by `floor * alpha * DeCI share`.
    `normalise`: "partition" (Eq. 11-13) or "model" (one total per saliency over every unit).
    """
    groups = _share_groups(parts, normalise)
    deci_n = normalise_within_partitions(deci, groups)
    reri_n = {masked: normalise_within_partitions(v, groups) for masked, v in reri.items()}
    scores = []
    for i, part in enumerate(parts):
        if part == "camera":
            penalty = reri_n["lidar"][i]  # camera parameters reactivated while the LiDAR was masked
        elif part == "lidar":
            penalty = reri_n["camera"][i]
        else:
            penalty = 0.5 * (reri_n["lidar"][i] + reri_n["camera"][i])
        score = alpha * deci_n[i] - beta * penalty
        scores.append(score if floor is None else torch.maximum(score, floor * alpha * deci_n[i]))
    return scores


def floored_fraction(
    deci: Units,
    reri: dict[str, Units],
    parts: list[str],
    alpha: float,
    beta: float,
    floor: float | None,
    normalise: str = "partition",
) -> dict[str, float]:
    """Per partition, the fraction of units whose ReRI penalty reaches the floor (printed Eq. 13: goes
    below it), so that their rank no longer follows their contribution. A high fraction in a partition
    that holds most of the FLOPs decides where a GFLOPs target is met."""
    printed = altereva_scores(deci, reri, parts, alpha, beta, None, normalise)
    shares = normalise_within_partitions(deci, _share_groups(parts, normalise))
    bound = floor if floor is not None else 0.0
    hit: dict[str, list[int]] = {}
    for score, share, part in zip(printed, shares, parts):
        counts = hit.setdefault(part, [0, 0])
        counts[0] += int(((score <= bound * alpha * share) & (share > 0)).sum())  # dead units are not overridden
        counts[1] += score.numel()
    return {part: n / total for part, (n, total) in hit.items() if total}
