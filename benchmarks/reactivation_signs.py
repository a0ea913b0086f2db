"""Why the signed penalty collapses at 90% sparsity: the signs of per-weight reactivation, measured.

AlterEva's ReRI for a weight is S_0 - S_B, with S = theta_0 * dL/dtheta (S_0 on the scoring set D at
theta_0 with one sensor masked, S_B on D_B after B reactivation steps). The `signed` penalty (ours,
issue 25) keeps max(0, S_B - S_0): meant as "reactivation grew this unit". That reading holds only if
S_B - S_0 has no preferred sign relative to S_0. Reactivation lowers the masked loss, so gradients
shrink as a whole; if |S_B| < |S_0| for most weights, S_B - S_0 has the sign of -S_0 and the signed
penalty falls on every weight whose removal raises the loss (S_0 < 0), in proportion to how much.

For one checkpoint and seed this prints and writes, per round and scored partition: how often
S_B - S_0 has the sign of -S_0, how often |S_B| < |S_0|, the ratio of total |S_B| to |S_0|, the share
of each penalty's mass on weights with S_0 < 0, the fraction floored; and, at the given sparsity
(one global threshold, as `prune --sparsity` selects), how many of the kept weights each penalty kept
with S_0 < 0 and its overlap with the paper form's kept set. "grown" = max(0, |S_B| - |S_0|) is the
reading the signed penalty was meant to have; it is measured here only, not a product option. Last, the
masked loss before and after reactivation for a few optimisers and learning rates: whether the B steps
lower it at all.

    python -m benchmarks.reactivation_signs --checkpoint fusion/weights/bevfusion-tiny-fusion --seed 0 \\
        --out reports/protocol-v2/reactivation-signs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

PENALTIES = ("reri", "signed", "grown")
SWEEP = (("sgd", 1e-3), ("sgd", 1e-4), ("sgd", 1e-5), ("adamw", 1e-3), ("adamw", 1e-4), ("adamw", 1e-5))


def lr_sweep(model, task, batches, steps: int = 8) -> dict:
    """Per masked modality: the largest per-parameter gradient norms at theta_0, and the scoring set's masked
    loss before and after `steps` reactivation steps for each (optimiser, lr) in SWEEP."""
    from compress.altereva import loss_gradients, mean_loss, reactivate
    from compress.partition import Partition, masked_modality

    partition = Partition.of(model, task.partition)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    result = {}
    for masked in ("lidar", "camera"):
        with masked_modality(model, partition, masked, "parameters"):
            grads = loss_gradients(model, task, batches)
            norms = sorted(((float(g.double().norm()), n) for n, g in grads.items()), reverse=True)
            row = {"top_gradients": [{"parameter": n, "norm": v} for v, n in norms[:3]], "runs": []}
            before = mean_loss(model, task, batches)
            frozen = set(partition.parameters(model, masked))
            masked_state = {k: v.clone() for k, v in model.state_dict().items()}
            for optimizer, lr in SWEEP:
                reactivate(model, task, frozen, batches, steps, lr, optimizer)
                after = mean_loss(model, task, batches)
                row["runs"].append({"optimizer": optimizer, "lr": lr, "before": before, "after": after})
                model.load_state_dict(masked_state)
        model.load_state_dict(theta0)
        result[masked] = row
    return result


def measure(checkpoint: str, seed: int, sparsity: float, threads: int, sweep: bool = True) -> dict:
    from compress.altereva import AlterEvaConfig, altereva_saliency
    from compress.partition import Partition
    from compress.scores import altereva_scores, in_float64, shares
    from compress.structured import protected_layers
    from compress.unstructured import global_masks, prunable_weights
    from fusion.checkpoint import load_checkpoint
    from fusion.task import first_sample, reference_task, scoring_set

    torch.set_num_threads(threads)
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    task = reference_task(model)
    batches = scoring_set(model.config, 4, 2, seed)
    # the paper form with SGD (the signed candidate's options); failure_weight > 0 only to keep S_0 per round
    config = AlterEvaConfig(reactivation_optimizer="sgd", failure_weight=1e-9)
    saliency = in_float64(
        lambda m, b: altereva_saliency(m, task, b, config, False), model, batches, task, {}, "float64"
    )
    weights = prunable_weights(model, protected_layers(model, task, first_sample(batches[0])))
    partition = Partition.of(model, task.partition)
    names = list(weights)
    parts = [partition.part_of(n) or "fusion" for n in names]
    deci = [saliency.deci[n].abs() for n in names]
    rounds, penalties = {}, {p: {} for p in PENALTIES}
    for masked, reri in saliency.reri.items():
        s0 = [saliency.masked_deci[masked][n] for n in names]
        sb = [s0[i] - reri[n] for i, n in enumerate(names)]
        penalties["reri"][masked] = [r.abs() for r in (reri[n] for n in names)]
        penalties["signed"][masked] = [(b - a).clamp_min(0) for a, b in zip(s0, sb)]
        penalties["grown"][masked] = [(b.abs() - a.abs()).clamp_min(0) for a, b in zip(s0, sb)]
        scored = ("camera", "fusion") if masked == "lidar" else ("lidar", "fusion")
        rounds[masked] = {
            part: _sign_stats(s0, sb, parts, part, {p: penalties[p][masked] for p in PENALTIES}) for part in scored
        }
    kept = {}
    for name in PENALTIES:
        scores = altereva_scores(deci, penalties[name], parts, 1.0, 1.0, 1e-3)
        floored = [(s <= 1e-3 * d_share).double() for s, d_share in zip(scores, shares(deci, parts, "partition"))]
        masks = global_masks(dict(zip(names, scores)), sparsity)
        kept[name] = {"masks": masks, "floored": _by_part(floored, parts, mean=True)}
    useful = {masked: [s < 0 for s in (saliency.masked_deci[masked][n] for n in names)] for masked in saliency.reri}
    selection = {}
    for name in PENALTIES:
        masks = kept[name]["masks"]
        total = sum(int(masks[n].sum()) for n in names)
        overlap = sum(int((masks[n] & kept["reri"]["masks"][n]).sum()) for n in names)
        selection[name] = {
            "floored": kept[name]["floored"],
            "kept": total,
            "overlap_with_reri": overlap / max(total, 1),
            # of the kept camera/fusion weights, the share whose removal raised the LiDAR-masked loss (S_0 < 0)
            "kept_useful_lidar_masked": sum(
                int((masks[n] & useful["lidar"][i]).sum()) for i, n in enumerate(names) if parts[i] != "lidar"
            )
            / max(sum(int(masks[n].sum()) for i, n in enumerate(names) if parts[i] != "lidar"), 1),
        }
    return {
        "lr_sweep": lr_sweep(model, task, batches) if sweep else None,
        "checkpoint": checkpoint,
        "seed": seed,
        "sparsity": sparsity,
        "threads": threads,
        "options": dataclasses.asdict(config),
        "rounds": rounds,
        "selection": selection,
    }


def _by_part(values: list[torch.Tensor], parts: list[str], mean: bool) -> dict[str, float]:
    sums, counts = {}, {}
    for v, p in zip(values, parts):
        sums[p] = sums.get(p, 0.0) + float(v.sum())
        counts[p] = counts.get(p, 0) + v.numel()
    return {p: sums[p] / counts[p] if mean else sums[p] for p in sums}


def _sign_stats(s0: list, sb: list, parts: list[str], part: str, penalties: dict[str, list]) -> dict:
    chosen = [i for i, p in enumerate(parts) if p == part]
    a = torch.cat([s0[i].double().flatten() for i in chosen])
    b = torch.cat([sb[i].double().flatten() for i in chosen])
    live = a != 0
    stats = {
        "weights": int(a.numel()),
        "difference_against_s0": float((torch.sign(b - a)[live] == -torch.sign(a[live])).double().mean()),
        "shrank": float((b.abs() < a.abs())[live].double().mean()),
        "total_abs_ratio": float(b.abs().sum() / a.abs().sum()),
        "useful": float((a < 0).double().mean()),
    }
    for name, values in penalties.items():
        v = torch.cat([values[i].double().flatten() for i in chosen])
        stats[f"{name}_mass_on_useful"] = float(v[a < 0].sum() / v.sum()) if float(v.sum()) > 0 else float("nan")
        stats[f"{name}_nonzero"] = float((v > 0).double().mean())
    return stats


def markdown(result: dict) -> str:
    lines = [
        "# Per-weight reactivation signs (the signed penalty's collapse at 90% sparsity)",
        "",
        f"`python -m benchmarks.reactivation_signs --checkpoint {result['checkpoint']} --seed {result['seed']} "
        f"--sparsity {result['sparsity']}` ({result['threads']} thread(s)); AlterEva paper form, SGD, B = 8, lr 1e-3, "
        "scoring set 4 x 2 scenes.",
        "",
        "| masked | scored | weights | sign(S_B-S_0) = -sign(S_0) | abs(S_B) < abs(S_0) | sum abs(S_B) / sum abs(S_0) "
        "| S_0 < 0 (useful) | penalty mass on useful: reri / signed / grown |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for masked, parts in result["rounds"].items():
        for part, s in parts.items():
            mass = " / ".join(f"{s[f'{p}_mass_on_useful']:.2f}" for p in PENALTIES)
            lines.append(
                f"| {masked} | {part} | {s['weights']} | {s['difference_against_s0']:.3f} | {s['shrank']:.3f} "
                f"| {s['total_abs_ratio']:.3f} | {s['useful']:.3f} | {mass} |"
            )
    lines += [
        "",
        f"At {result['sparsity']:.0%} sparsity (one global threshold):",
        "",
        "| penalty | floored camera / lidar / fusion | kept camera+fusion weights with S_0 < 0 (LiDAR masked) "
        "| kept set shared with reri |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, s in result["selection"].items():
        f = s["floored"]
        floored = " / ".join(f"{f.get(p, float('nan')):.2f}" for p in ("camera", "lidar", "fusion"))
        lines.append(f"| {name} | {floored} | {s['kept_useful_lidar_masked']:.3f} | {s['overlap_with_reri']:.3f} |")
    if result.get("lr_sweep"):
        lines += [
            "",
            "Reactivation is meant to lower the masked loss. The scoring set's mean loss with one sensor masked, at "
            "theta_0 and after 8 steps (the largest gradient norm at theta_0 in brackets):",
            "",
            "| masked | " + " | ".join(f"{o} {lr:g}" for o, lr in SWEEP) + " |",
            "| --- | " + " | ".join("---:" for _ in SWEEP) + " |",
        ]
        for masked, row in result["lr_sweep"].items():
            top = row["top_gradients"][0]
            cells = " | ".join(f"{r['before']:.3f} -> {r['after']:.3f}" for r in row["runs"])
            lines.append(f"| {masked} ({top['parameter']}: {top['norm']:.0f}) | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reactivation_signs", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", default="fusion/weights/bevfusion-tiny-fusion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-lr-sweep", action="store_true", help="skip the reactivation loss per optimiser and lr")
    parser.add_argument("--out", type=Path, default=Path("reports/protocol-v2/reactivation-signs"))
    args = parser.parse_args(argv)
    from common.io import atomic_write_text

    result = measure(args.checkpoint, args.seed, args.sparsity, args.threads, not args.no_lr_sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.checkpoint).name}-seed{args.seed}"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
