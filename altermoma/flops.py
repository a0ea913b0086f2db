"""GFLOPs and parameters per stage of a BEVFusion-style model, counted with FlopCounterMode.

Convention (shared/DESIGN.md, "Measurement rules"): GFLOPs = FlopCounterMode total / 1e9, and
FlopCounterMode already counts 2 FLOPs per multiply-accumulate: for a convolution it reports
2 x (output elements) x (C_in / groups) x kH x kW, bias excluded (tests/test_flops.py checks one Conv2d
against that hand count). It counts convolutions (transposed too) and matrix products (mm, addmm, bmm,
baddbmm, einsum/matmul through them, attention); element-wise ops, softmax, BatchNorm, pooling and the
gathers/scatters/cumsums of BEV pooling count zero, as in fvcore-style counters. The largest uncounted
term is the LSS outer product (depth x context): N*D*h*w*C multiplies, 0.16 G for r50 (about 0.02%).
Sparse convolutions (the `bevfusion-*` presets' voxel encoder) count 2 x active rulebook pairs x Cin x Cout,
as `compress.flops` counts them, not the padded gather the plain backend multiplies; their pairs need real
data, so such models are not counted on the meta device.

Stages (module paths; the per-module breakdown of FlopCounterMode is hierarchical, so only these
disjoint subtrees are read): camera = camera.backbone + camera.neck; view_transform = camera.vtransform
(depth and context convs, lift, BEV pool, BEV downsample); lidar; fuser; decoder; heads. Anything that
falls outside them (nothing, for the reference model) is reported as "other", so the stages always sum
to the total.

Counting only needs shapes: `device="meta"` counts a meta-device copy of the model (no memory, no
compute), which gives the same numbers as a real run (tested).

    python -m altermoma.flops --preset r50            # real CPU forward, also times each stage
    python -m altermoma.flops --preset r50 --meta     # shapes only, instant
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.layers import is_sparse_conv

STAGES: dict[str, tuple[str, ...]] = {
    "camera": ("camera.backbone", "camera.neck"),
    "view_transform": ("camera.vtransform",),
    "lidar": ("lidar",),
    "fuser": ("fuser",),
    "decoder": ("decoder",),
    "heads": ("heads",),
}


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    node: nn.Module | None = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def stage_modules(model: nn.Module) -> dict[str, list[str]]:
    """The module paths of each stage present in `model` (single-modal models lack some stages)."""
    present = {}
    for stage, paths in STAGES.items():
        found = [p for p in paths if isinstance(_get_submodule(model, p), nn.Module)]
        if found:
            present[stage] = found
    return present


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def stage_flops(model: nn.Module, inputs: Mapping[str, torch.Tensor], device: str | None = None) -> dict[str, Any]:
    """GFLOPs and parameters per stage and in total for one forward pass on `inputs`.

    Returns {stage: {"flops": int, "gflops": float, "params": int}, ..., "total": {...}}; stages
    sum exactly to the total ("other" holds any remainder outside the named stages). `device="meta"`
    counts a meta-device copy (shapes only), except for a model with sparse convolutions: they are counted
    from their rulebooks' active pairs, which need the real inputs, so such a model runs on them.
    """
    was_training = model.training
    counted = model
    sparse = [name for name, m in model.named_modules() if is_sparse_conv(m)]
    if device == "meta" and not sparse:
        counted = copy.deepcopy(model).to("meta")
        inputs = {k: v.to("meta") for k, v in inputs.items()}
    counted.eval()
    names = getattr(model, "input_names", list(inputs))
    pairs = _sparse_pair_hooks(counted, sparse)
    try:
        with FlopCounterMode(display=False) as counter:
            counted(**{k: inputs[k] for k in names})
    finally:
        model.train(was_training)
        for handle in pairs.pop("_handles"):
            handle.remove()
    per_module = counter.get_flop_counts()
    root = type(counted).__name__  # FlopCounterMode keys modules as "<RootClass>.<path>"
    # Inside a sparse conv FlopCounterMode sees the plain backend's padded gather (or nothing, for spconv):
    # that count is replaced by 2 x active rulebook pairs x Cin x Cout (compress.flops' rule).
    correction = {p: pairs[p] - int(sum(per_module.get(f"{root}.{p}", {}).values())) for p in sparse}
    total_flops = int(counter.get_total_flops()) + sum(correction.values())
    result: dict[str, Any] = {}
    attributed = 0
    for stage, paths in stage_modules(model).items():
        flops = sum(int(sum(per_module.get(f"{root}.{p}", {}).values())) for p in paths)
        flops += sum(c for name, c in correction.items() if any(name.startswith(p + ".") for p in paths))
        params = sum(count_params(_get_submodule(model, p)) for p in paths)
        result[stage] = {"flops": flops, "gflops": flops / 1e9, "params": params}
        attributed += flops
    total_params = count_params(model)
    other_params = total_params - sum(v["params"] for v in result.values())
    if total_flops != attributed or other_params:
        other = total_flops - attributed
        result["other"] = {"flops": other, "gflops": other / 1e9, "params": other_params}
    result["total"] = {"flops": total_flops, "gflops": total_flops / 1e9, "params": total_params}
    return result


def _sparse_pair_hooks(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Forward hooks recording each sparse conv's FLOPs from its rulebook's active pairs (`compress.sparse`)."""
    from compress.sparse import active_pairs, sparse_flops

    counts: dict[str, Any] = {name: 0 for name in names}
    modules = dict(model.named_modules())

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            counted = active_pairs(module, inputs, output)
            if counted is None:
                raise ValueError(f"sparse convolution {name}: its pairs cannot be counted")
            counts[name] += int(sparse_flops(module, counted))

        return record

    counts["_handles"] = [modules[name].register_forward_hook(hook(name)) for name in names]
    return counts


@torch.no_grad()
def split_stage_flops(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], device: str | None = None
) -> dict[str, Any]:
    """GFLOPs and params of each CUDA-BEVFusion split stage (`BEVFusion.export_stages`), counted stage by
    stage on that stage's real inputs, plus "total"; matches the per-stage latency of the split graphs.
    `device="meta"` as in `stage_flops` (a model with sparse convolutions is counted on its real inputs)."""
    from export.onnx import as_stages, eval_mode, stage_tensors
    from fusion.models.stages import split_stages

    if device == "meta" and not any(is_sparse_conv(m) for m in model.modules()):
        model = copy.deepcopy(model).to("meta")
        inputs = {k: v.to("meta") for k, v in inputs.items()}
    result: dict[str, Any] = {}
    with eval_mode(model):
        stages = as_stages(split_stages(model, inputs))
        tensors = stage_tensors(stages, inputs)
        for stage in stages:
            sparse = [name for name, m in stage.module.named_modules() if is_sparse_conv(m)]
            pairs = _sparse_pair_hooks(stage.module, sparse)
            try:
                with FlopCounterMode(display=False) as counter:
                    stage(tensors)
            finally:
                for handle in pairs.pop("_handles"):
                    handle.remove()
            per_module, root = counter.get_flop_counts(), type(stage.module).__name__
            flops = int(counter.get_total_flops())
            flops += sum(pairs[p] - int(sum(per_module.get(f"{root}.{p}", {}).values())) for p in sparse)
            result[stage.name] = {"flops": flops, "gflops": flops / 1e9, "params": stage.params}
    total = sum(v["flops"] for v in result.values())
    result["total"] = {"flops": total, "gflops": total / 1e9, "params": count_params(model)}
    return result


def timed_stages(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Wall time (s) spent in each stage's modules during one real forward pass (forward hooks)."""
    spent: dict[str, float] = {}
    handles = []
    for stage, paths in stage_modules(model).items():
        for path in paths:
            module = _get_submodule(model, path)
            started: list[float] = []

            def pre(_m, _args, started=started) -> None:
                started.append(time.perf_counter())

            def post(_m, _args, _out, started=started, stage=stage) -> None:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - started.pop()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            start = time.perf_counter()
            model(**{k: inputs[k] for k in model.input_names})
            spent["total"] = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def flops_table(result: Mapping[str, Any], seconds: Mapping[str, float] | None = None) -> str:
    """Markdown table of a `stage_flops` result (plus per-stage seconds when given)."""
    total = result["total"]["flops"] or 1
    head = "| stage | GFLOPs | share | params (M) |" + (" CPU s |" if seconds else "")
    rule = "| --- | ---: | ---: | ---: |" + (" ---: |" if seconds else "")
    lines = [head, rule]
    for stage, row in result.items():
        line = f"| {stage} | {row['gflops']:.2f} | {100 * row['flops'] / total:.1f}% | {row['params'] / 1e6:.3f} |"
        if seconds:
            line += f" {seconds.get(stage, float('nan')):.2f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GFLOPs and parameters per stage of a BEVFusion-style model.")
    parser.add_argument("--preset", default="r50", help="tiny | small | r50 (default r50)")
    parser.add_argument("--modality", choices=("fusion", "camera", "lidar"), default="fusion")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--checkpoint", help="count a checkpoint (e.g. a pruned one) instead of random weights")
    parser.add_argument("--pool-method", choices=("scatter", "cumsum"), help="BEV pooling (default: the config's)")
    parser.add_argument("--meta", action="store_true", help="count shapes only on the meta device (no forward pass)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the real forward pass")
    parser.add_argument("--out", default="reports", help="directory for flops-<preset>.{md,json}")
    args = parser.parse_args(argv)

    from common.io import atomic_write_text
    from export.onnx import torch_threads
    from fusion.checkpoint import load_checkpoint
    from fusion.config import get_config
    from fusion.models.bevfusion import build_model, example_inputs, pool_method_as

    rss_before = _peak_rss_mib()
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(0)
        model = build_model(get_config(args.preset), args.modality).eval()
        source = "random weights"
    config = model.config
    if args.meta and any(is_sparse_conv(m) for m in model.modules()):
        print("error: --meta cannot count sparse convolutions (their rulebooks are data): drop --meta", file=sys.stderr)
        return 2
    inputs = example_inputs(config, args.batch_size, model.modality)
    seconds = None
    with torch_threads(args.threads), pool_method_as(model, args.pool_method):
        start = time.perf_counter()
        result = stage_flops(model, inputs, device="meta" if args.meta else None)
        count_seconds = time.perf_counter() - start
        if not args.meta:
            seconds = timed_stages(model, inputs)
        pool = None if model.camera is None else model.camera.vtransform.pool
        pool_method = None if pool is None else pool.method  # read while --pool-method is in force
    record = {
        "preset": config.preset,
        "modality": model.modality,
        "source": source,
        "batch_size": args.batch_size,
        "images": list(inputs["images"].shape) if "images" in inputs else None,
        "bev": [config.grid.size_y, config.grid.size_x],
        "pillars": list(inputs["pillars"].shape) if "pillars" in inputs else None,
        "pool_method": pool_method,
        "frustum_points": None if pool is None else int(pool.point_index.numel()),
        "counting": "meta device (shapes only)" if args.meta else f"real CPU forward, {args.threads} torch thread(s)",
        "count_seconds": round(count_seconds, 2),
        "stage_seconds": seconds,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "peak_rss_mib_before_model": round(rss_before, 1),
        "torch": torch.__version__,
        "stages": result,
    }
    title = f"# GFLOPs per stage: preset `{config.preset}` ({model.modality}, {source}, batch {args.batch_size})"
    notes = [
        "",
        "GFLOPs = FlopCounterMode total / 1e9 = 2 x multiply-accumulates (convolutions and matrix products; "
        "element-wise ops, BatchNorm, softmax and the BEV-pooling gathers/scatters/cumsums count zero).",
        f"Inputs: images {record['images']}, pillars {record['pillars']}, BEV {record['bev']}, "
        f"{record['frustum_points']} frustum points in the BEV pool ({record['pool_method']}).",
        f"Counted by {record['counting']} in {record['count_seconds']} s; peak RSS {record['peak_rss_mib']} MiB.",
        "",
    ]
    markdown = "\n".join([title, *notes, flops_table(result, seconds), ""])
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"flops-{config.preset}.json", json.dumps(record, indent=2))
    atomic_write_text(out / f"flops-{config.preset}.md", markdown)
    print(f"wrote {out / f'flops-{config.preset}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
