"""Importance scores per unit (a channel or a weight), from signed saliencies.

AlterEva's combination (paper Eq. 13), normalised within each partition:
    camera:  S = alpha * DeCI/sum(DeCI) - beta * ReRI_lidar-masked / sum(...)
    lidar:   S = alpha * DeCI/sum(DeCI) - beta * ReRI_camera-masked / sum(...)
    fusion:  S = alpha * DeCI/sum(DeCI) - beta/2 * (both ReRI terms, each normalised)
With alpha = beta = 1 each partition's scores sum to zero, so a single global threshold cuts small
partitions less: the pruning report shows the kept ratio per partition.
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


def altereva_scores(deci: Units, reri: dict[str, Units], parts: list[str], alpha: float, beta: float) -> Units:
    """Combine |DeCI| and |ReRI| (per masked modality) into AlterEva scores; higher means keep."""
    deci_n = normalise_within_partitions(deci, parts)
    reri_n = {masked: normalise_within_partitions(v, parts) for masked, v in reri.items()}
    scores = []
    for i, part in enumerate(parts):
        if part == "camera":
            penalty = reri_n["lidar"][i]  # camera parameters reactivated while the LiDAR was masked
        elif part == "lidar":
            penalty = reri_n["camera"][i]
        else:
            penalty = 0.5 * (reri_n["lidar"][i] + reri_n["camera"][i])
        scores.append(alpha * deci_n[i] - beta * penalty)
    return scores
