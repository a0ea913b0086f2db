"""Build per-layer latency tables (`compress.latency`) by timing every prunable layer on the target backend.

Each conv/linear layer is timed as a snippet, the layer with the BatchNorm and activation that follow it in
the model (found from the order of module calls on the example batch), at the input and output sizes it
sees in the model (forward hooks), over a grid of input x output widths in `round_to` steps. A dimension no
group prunes is timed at its full width only. Per point: warm-up calls, then `runs` timed calls, median.
Backends: `ort-cpu` (each snippet exported to a tiny ONNX graph and run in ONNX Runtime with
intra_op_num_threads = threads, as `altermoma.bench` runs whole models), `torch-cpu`, `torch-cuda`.

Grid: every `round_to` multiple up to `grid_points` per dimension, thinned evenly beyond that (always the
smallest and the full width), bilinear interpolation in between. Layers with the same op, shapes and
snippet are timed once. The interpolation error is measured on `check_points` off-grid widths and
recorded in the table (`checks.interpolation`). The "rest" (everything outside the table) is the
unpruned model measured end to end on the same backend minus the sum of the full-width entries.

For TensorRT on the device itself (Jetson), `write_trtexec_folder` writes the snippets as ONNX files plus a
shell script of trtexec runs, and `parse_trtexec_folder` turns their logs into the same table format.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import random
import re
import shlex
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from altermoma.bench import environment, measure
from common.task import Task
from compress.latency import LatencyTable, LayerEntry, layer_widths, prunable_dims, width_grid
from compress.structured import LAYERS, ChannelGraph, is_depthwise, min_kept
from export.onnx import eval_mode, export_onnx, session_options, torch_threads

TIMED_BACKENDS = ("ort-cpu", "torch-cpu", "torch-cuda")
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Tanh)
TRT_KIND = "latency-trtexec"
SNIPPETS = "snippets.json"


@dataclass
class Subject:
    """The model a table is built for: unpruned, with its task and the example batch pruning will trace."""

    model: nn.Module
    task: Task
    example_batch: Any
    source: str
    preset: str | None = None


@dataclass
class Snippet:
    """One layer and its followers, rebuilt at any widths."""

    name: str
    layer: nn.Module
    norm: nn.Module | None
    act: nn.Module | None
    shapes: list[tuple[list[int], list[int]]]

    @property
    def parts(self) -> list[str]:
        return [type(m).__name__ for m in (self.layer, self.norm, self.act) if m is not None]

    def signature(self) -> str:
        """Identical signatures time identically: op and its hyper-parameters, shapes, followers."""
        layer = self.layer
        keys = ("kernel_size", "stride", "padding", "dilation", "output_padding", "padding_mode")
        hyper = {k: getattr(layer, k) for k in keys if hasattr(layer, k)}
        hyper["bias"] = layer.bias is not None
        hyper["depthwise"] = is_depthwise(layer)
        return json.dumps([self.parts, repr(sorted(hyper.items())), self.shapes, layer_widths(layer)])

    def build(self, c_in: int, c_out: int) -> tuple[nn.Module, list[torch.Tensor]]:
        """The snippet at widths (c_in, c_out) in eval mode, and one random input per call of the layer."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            first = nn.Linear(c_in, c_out, bias=layer.bias is not None)
        else:
            kwargs = dict(
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=c_out if is_depthwise(layer) else 1,
                bias=layer.bias is not None,
            )
            if hasattr(layer, "output_padding") and isinstance(layer, nn.modules.conv._ConvTransposeNd):
                kwargs["output_padding"] = layer.output_padding
            else:
                kwargs["padding_mode"] = layer.padding_mode
            in_width = c_out if is_depthwise(layer) else c_in
            first = type(layer)(in_width, c_out, layer.kernel_size, **kwargs)
        modules = [first]
        if self.norm is not None:
            modules.append(type(self.norm)(c_out))
        if self.act is not None:
            modules.append(copy.deepcopy(self.act))
        dim = -1 if isinstance(layer, nn.Linear) else 1
        inputs = []
        for in_shape, _ in self.shapes:
            shape = list(in_shape)
            shape[dim] = c_out if is_depthwise(layer) else c_in
            inputs.append(torch.randn(shape))
        return nn.Sequential(*modules).eval(), inputs


def find_snippets(model: nn.Module, task: Task, example_batch: Any, graph: ChannelGraph) -> dict[str, Snippet]:
    """Every conv/linear layer that runs on the example batch, with the BatchNorm that consumes its output
    right after it and the activation module that consumes the BatchNorm's (or the layer's) output."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, tuple, tuple]] = []  # (module, input (data_ptr, shape), output ...), call order

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            x = inputs[0]
            calls.append((module, (x.data_ptr(), tuple(x.shape)), (output.data_ptr(), tuple(output.shape))))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    args, kwargs = task.arguments(example_batch)
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    followers: dict[str, tuple[nn.Module | None, nn.Module | None]] = {}
    # A follower reads the very tensor the layer wrote (same storage and shape: a permuted view is not one).
    for i, (module, _, out_ptr) in enumerate(calls):
        if not isinstance(module, LAYERS) or names[module] in followers:
            continue
        norm = act = None
        j = i + 1
        if j < len(calls) and isinstance(calls[j][0], nn.modules.batchnorm._BatchNorm) and calls[j][1] == out_ptr:
            norm, out_ptr, j = calls[j][0], calls[j][2], j + 1
        if j < len(calls) and isinstance(calls[j][0], ACTIVATIONS) and calls[j][1] == out_ptr:
            act = calls[j][0]
        followers[names[module]] = (norm, act)
    modules = dict(model.named_modules())
    return {
        name: Snippet(name, modules[name], *followers.get(name, (None, None)), shapes)
        for name, shapes in graph.layer_shapes.items()
    }


# ---- timing ---------------------------------------------------------------------------------------
def onnx_bytes(module: nn.Module, inputs: list[torch.Tensor]) -> bytes:
    """The snippet as a small ONNX graph (legacy exporter, constant folding: BN folds into the conv)."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs[:1]),
            buffer,
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def timer(backend: str, threads: int, warmup: int, runs: int) -> Callable[[nn.Module, list[torch.Tensor]], float]:
    """A function (snippet, inputs per call) -> summed median ms over the calls, on `backend`."""
    if backend == "ort-cpu":
        import onnxruntime as ort

        options = session_options(threads)

        def time_ort(module: nn.Module, inputs: list[torch.Tensor]) -> float:
            total = 0.0
            for x in inputs:
                session = ort.InferenceSession(onnx_bytes(module, [x]), options, providers=["CPUExecutionProvider"])
                feeds = {"x": x.numpy()}
                total += measure(lambda s=session, f=feeds: s.run(None, f), warmup, runs)["median_ms"]
            return total

        return time_ort
    if backend == "torch-cpu":

        def time_torch(module: nn.Module, inputs: list[torch.Tensor]) -> float:
            with torch_threads(threads), torch.inference_mode():
                return sum(measure(lambda x=x: module(x), warmup, runs)["median_ms"] for x in inputs)

        return time_torch
    if backend == "torch-cuda":
        require_cuda()

        def time_cuda(module: nn.Module, inputs: list[torch.Tensor]) -> float:
            gpu = module.cuda()
            total = 0.0
            with torch.inference_mode():
                for x in inputs:
                    x = x.cuda()

                    def call(x=x) -> None:
                        gpu(x)
                        torch.cuda.synchronize()

                    total += measure(call, warmup, runs)["median_ms"]
            return total

        return time_cuda
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(TIMED_BACKENDS)} or trtexec-script)")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--backend torch-cuda needs a CUDA device: torch {torch.__version__} ({build}) sees none")


def model_runner(
    model: nn.Module, task: Task, example_batch: Any, backend: str, threads: int, workdir: Path
) -> Callable[[], Any]:
    """A call that runs a whole model once on the backend (ORT: exported to `workdir` first; CUDA: synchronised)."""
    args, kwargs = task.arguments(example_batch)
    if backend == "ort-cpu":
        from export.onnx import ort_session

        tensors = list(kwargs.values()) if kwargs else list(args)
        path = workdir / f"model-{len(list(workdir.iterdir()))}.onnx"
        details = export_onnx(model, kwargs if kwargs else args, path, check=False, threads=threads)
        session = ort_session(details["path"], threads)
        feeds = dict(zip(details["input_names"], (t.detach().cpu().numpy() for t in tensors)))
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        return lambda: session.run(None, feeds)
    if backend == "torch-cuda":
        gpu = copy.deepcopy(model).cuda().eval()
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

        def call_cuda() -> None:
            with torch.inference_mode():
                gpu(*args, **kwargs)
            torch.cuda.synchronize()

        return call_cuda
    model = model.eval()

    def call() -> None:
        with torch.inference_mode():
            model(*args, **kwargs)

    return call


def paired_medians(a: Callable[[], Any], b: Callable[[], Any], warmup: int, runs: int, block: int = 4):
    """Median ms of `a` and of `b`, timed in alternating blocks of `block` calls, so that a burst of load
    from another process falls on both alike and cancels in their difference."""
    for _ in range(warmup):
        a()
        b()
    samples: tuple[list[float], list[float]] = ([], [])
    while len(samples[0]) < runs:
        for fn, out in ((a, samples[0]), (b, samples[1])):
            for _ in range(block):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples[0])), float(np.median(samples[1]))


def calibration_points(graph: ChannelGraph, round_to: int, grid_points: int) -> list[tuple[str, int, int]]:
    """(group root, channels, kept) per group: the grid width nearest a quarter of the group (above the
    default 90% cap), so the layers' part of the change is read off grid points, not interpolated."""
    points = []
    for group in graph.groups:
        n = group.channels
        floor = min_kept(n, round_to, 0.9)
        widths = [w for w in width_grid(n, True, round_to, grid_points) if floor <= w < n]
        if widths:
            points.append((group.root, n, min(widths, key=lambda w: (abs(w - n / 4), w))))
    return points


def pruned_copy(subject: Subject, root: str, removed: int) -> nn.Module:
    """A copy of the subject's model with `removed` channels of the group rooted at `root` cut."""
    model = copy.deepcopy(subject.model)
    graph = ChannelGraph(model, subject.task, subject.example_batch)
    masks = [torch.arange(g.channels) < (removed if g.root == root else 0) for g in graph.groups]
    graph.prune(masks)
    return model.eval()


def table_ms_of(model: nn.Module, layers: dict[str, LayerEntry]) -> float:
    """The table's layers at a (pruned) model's widths."""
    modules = dict(model.named_modules())
    return sum(entry.lookup(*layer_widths(modules[name])) for name, entry in layers.items())


def rest_term(n: int, kept: int, e2e_ms: float, base_ms: float, table_ms: float, table_full_ms: float) -> dict:
    """One group's rest term: the change of (measured - table) when the group is cut from n to `kept`, against
    the unpruned model measured right before and after it (`base_ms`, so slow drifts of the machine cancel)."""
    change = (e2e_ms - base_ms) - (table_ms - table_full_ms)
    return {"channels": n, "kept": kept, "end_to_end_ms": e2e_ms, "unpruned_ms": base_ms, "table_ms": table_ms,
            "rest_change_ms": change, "ms_per_channel": -change / (n - kept), "used": False}  # fmt: skip


OUTLIER_SIGMAS = 5.0


def choose_rest_terms(terms: dict[str, dict], noise_ms: float, e2e_ms: float, floor: float) -> dict[str, Any]:
    """Mark the terms to use: those that stand out among all groups.

    Most groups move the rest by a millisecond or two either way (on small: median |change| 0.4 ms, all
    but one within 2.2 ms): ONNX Runtime picks other layouts and fusions at other widths, shifts that
    need not add up over groups (on one build of the small table, using all 40 terms under-predicted the
    pruned models by 7-9%; on the committed one, all terms and the outliers alone predict alike,
    reports/latency-target/rest-ablation-small.md) and that are the most exposed to load from other
    processes. Work that really scales with one group's channels and no conv carries (the LSS pooling
    over the context channels, -40 ms there) stands far out. A term is used when |change| is at least
    max(5 x 1.4826 x MAD of all changes, 3 x noise, `floor` x end to end)."""
    changes = np.array([t["rest_change_ms"] for t in terms.values()])
    spread = 1.4826 * float(np.median(np.abs(changes - np.median(changes)))) if len(changes) else 0.0
    threshold = max(OUTLIER_SIGMAS * spread, 3.0 * noise_ms, floor * e2e_ms)
    for t in terms.values():
        t["used"] = abs(t["rest_change_ms"]) >= threshold
    return {
        "noise_ms": noise_ms,
        "robust_spread_ms": spread,
        "threshold_ms": threshold,
        "rule": f"used when |rest change| >= max({OUTLIER_SIGMAS:g} x 1.4826 x MAD of all groups' changes, 3 x noise, "
        f"{floor:.1%} of end to end); noise: the unpruned model timed against itself the same way",
        "used": sorted(root for root, t in terms.items() if t["used"]),
    }


# ---- the table ------------------------------------------------------------------------------------
def plan(subject: Subject, round_to: int, grid_points: int) -> tuple[ChannelGraph, dict[str, Snippet], dict]:
    """The channel graph, the snippets, and per layer its grids {"in": [...], "out": [...]}."""
    graph = ChannelGraph(subject.model, subject.task, subject.example_batch)
    snippets = find_snippets(subject.model, subject.task, subject.example_batch, graph)
    dims = prunable_dims(graph)
    grids = {}
    for name, snippet in snippets.items():
        c_in, c_out = layer_widths(snippet.layer)
        grid_out = width_grid(c_out, dims[name][1], round_to, grid_points)
        grid_in = [c_in] if is_depthwise(snippet.layer) else width_grid(c_in, dims[name][0], round_to, grid_points)
        grids[name] = {"in": grid_in, "out": grid_out}
    return graph, snippets, grids


def build_table(
    subject: Subject,
    backend: str = "ort-cpu",
    threads: int = 1,
    round_to: int = 8,
    grid_points: int = 16,
    runs: int = 20,
    warmup: int = 5,
    check_points: int = 8,
    end_to_end_runs: int = 50,
    rest_terms: bool = True,
    rest_threshold: float = 0.01,
    workdir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Time every layer snippet over its grid (and a few off-grid checks) and the model end to end; with
    `rest_terms`, also the model with each group cut to about a quarter (the rest's per-group slopes)."""
    import tempfile

    if backend not in TIMED_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(TIMED_BACKENDS)})")
    if backend == "torch-cuda":
        require_cuda()
    if threads < 1 or runs < 1 or warmup < 0 or round_to < 1 or grid_points < 2:
        raise ValueError("need threads >= 1, runs >= 1, warmup >= 0, round_to >= 1 and grid_points >= 2")
    say = progress or (lambda _text: None)
    start = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    graph, snippets, grids = plan(subject, round_to, grid_points)
    time_snippet = timer(backend, threads, warmup, runs)
    cache: dict[tuple[str, int, int], float] = {}
    retimed = []

    def timed(snippet: Snippet, c_in: int, c_out: int, again: bool = False) -> float:
        key = (snippet.signature(), c_in, c_out)
        if key not in cache or again:
            value = time_snippet(*snippet.build(c_in, c_out))
            cache[key] = min(value, cache.get(key, math.inf))
        return cache[key]

    def recheck(snippet: Snippet, grid: dict[str, list[int]], ms: list[list[float]]) -> None:
        """A point slower by over 25% than a point with at least as many channels in both dimensions is
        timed again (twice at most; the smaller median stays): a burst of load from another process,
        more often than a property of the layer."""
        depthwise = is_depthwise(snippet.layer)
        for _ in range(2):
            suspects = [
                (i, j)
                for i in range(len(ms))
                for j in range(len(ms[i]))
                if ms[i][j] > 1.25 * min(ms[a][b] for a in range(i, len(ms)) for b in range(j, len(ms[a])))
            ]
            for i, j in suspects:
                co = grid["out"][j]
                before = ms[i][j]
                ms[i][j] = timed(snippet, co if depthwise else grid["in"][i], co, again=True)
                retimed.append({"layer": snippet.name, "c_in": grid["in"][i], "c_out": co, "first_ms": before,
                                "kept_ms": ms[i][j]})  # fmt: skip
            if not suspects:
                return

    layers = {}
    for k, (name, snippet) in enumerate(snippets.items()):
        grid = grids[name]
        rows = grid["in"]
        depthwise = is_depthwise(snippet.layer)
        ms = [[timed(snippet, co if depthwise else ci, co) for co in grid["out"]] for ci in rows]
        recheck(snippet, grid, ms)
        c_in, c_out = layer_widths(snippet.layer)
        shapes = [[list(i), list(o)] for i, o in snippet.shapes]
        layers[name] = LayerEntry(
            type(snippet.layer).__name__, c_in, c_out, shapes, grid["in"], grid["out"], ms, snippet.parts, depthwise
        )
        say(f"[{k + 1}/{len(snippets)}] {name}: {len(rows)}x{len(grid['out'])} widths, full {ms[-1][-1]:.3f} ms")
    checks = interpolation_check(snippets, layers, timed, round_to, check_points)
    check = checks["interpolation"]
    if check.get("linear_ms_weighted_abs_error", math.inf) < check.get("ms_weighted_abs_error", math.inf):
        for entry in layers.values():  # this backend's costs are smooth rather than stepped: interpolate
            entry.interpolation = "linear"
        check["chosen"] = "linear (it measured the smaller ms-weighted error)"
    elif "points" in check and check["points"]:
        check["chosen"] = "ceil (it measured the smaller ms-weighted error)"
    checks["retimed"] = {"rule": "a point over 25% slower than one with more channels in both dimensions is "
                         "timed again, twice at most; the smaller median stays", "points": retimed}  # fmt: skip
    full = sum(e.full_ms for e in layers.values())
    e2e_runs = max(runs, end_to_end_runs)
    terms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp, torch_threads(threads):
        workdir = Path(workdir) if workdir is not None else Path(tmp)

        def runner(model: nn.Module) -> Callable[[], Any]:
            return model_runner(model, subject.task, subject.example_batch, backend, threads, workdir)

        unpruned = runner(subject.model)
        first = measure(unpruned, warmup, e2e_runs)["median_ms"]
        say(f"end to end {first:.2f} ms, table at full width {full:.2f} ms, rest {first - full:.2f} ms")
        base, measured, null = [first], [], []
        points = calibration_points(graph, round_to, grid_points) if rest_terms else []
        for k, (root, n, kept) in enumerate(points):
            if k in (0, len(points) // 2, len(points) - 1):  # the unpruned model against itself: the noise
                null.append(abs(np.subtract(*paired_medians(unpruned, unpruned, warmup, max(runs, 20)))))
            model = pruned_copy(subject, root, n - kept)
            ms, unpruned_ms = paired_medians(runner(model), unpruned, warmup, max(runs, 20))
            base.append(unpruned_ms)
            measured.append((root, n, kept, ms, unpruned_ms, table_ms_of(model, layers)))
            change = (ms - unpruned_ms) - (measured[-1][5] - full)
            say(f"rest term {root}: {n} -> {kept} channels, rest change {change:+.2f} ms")
    e2e = float(np.median(base))
    if measured:
        noise = float(max(null))
        spread = (max(base) - min(base)) / e2e
        terms = {root: rest_term(n, kept, ms, b, t, full) for root, n, kept, ms, b, t in measured}
        checks["rest_terms"] = {
            "unpruned_ms": base,
            "unpruned_spread": spread,
            **choose_rest_terms(terms, noise, e2e, rest_threshold),
        }
    env = environment(threads, _batch_size(snippets))
    env.update(backend=backend, load_average_at_start=load_at_start)
    return LatencyTable(
        backend=backend,
        layers=layers,
        end_to_end_ms=e2e,
        rest_ms=e2e - full,
        environment=env,
        settings={
            "threads": threads,
            "round_to": round_to,
            "grid_points": grid_points,
            "runs": runs,
            "warmup": warmup,
            "end_to_end_runs": e2e_runs,
            "rest_terms": "per group, measured" if rest_terms else "none: the rest is a constant",
            "statistic": "median",
            "interpolation": "between grid widths, the next grid width up (ceil) or bilinear, whichever measured "
            "the smaller error on the off-grid checks (ceil without checks); clamped at the grid's edges",
            "snippet": "the layer + the BatchNorm and activation module that consume its output in the model",
            "distinct_points_timed": len(cache),
            "seconds": round(time.perf_counter() - start, 1),
        },
        model=model_info(subject, graph),
        checks=checks,
        rest_terms=terms,
    )


def _batch_size(snippets: dict[str, Snippet]) -> int:
    first = next(iter(snippets.values()), None)
    return int(first.shapes[0][0][0]) if first is not None and first.shapes[0][0] else 1


def model_info(subject: Subject, graph: ChannelGraph) -> dict[str, Any]:
    return {
        "source": subject.source,
        "preset": subject.preset,
        "class": type(subject.model).__name__,
        "layers": len(graph.layer_shapes),
        "groups": len(graph.groups),
        "protected": sorted(graph.protected),
    }


def interpolation_check(
    snippets: dict[str, Snippet], layers: dict[str, LayerEntry], timed, round_to: int, count: int
) -> dict[str, Any]:
    """Time `count` widths on the round_to lattice that are not grid points (half drawn uniformly, half from
    the five slowest layers with thinned grids, where errors cost most) and compare with the table."""
    candidates = []
    for name, entry in layers.items():
        lattice_out = width_grid(entry.c_out, len(entry.grid_out) > 1, round_to, 10**6)
        lattice_in = (
            [entry.c_in] if entry.depthwise else width_grid(entry.c_in, len(entry.grid_in) > 1, round_to, 10**6)
        )
        for ci in lattice_in:
            for co in lattice_out:
                if (ci not in entry.grid_in and not entry.depthwise) or co not in entry.grid_out:
                    candidates.append((name, ci, co))
    if not candidates or count == 0:
        return {
            "interpolation": {"points": [], "note": "no off-grid width checked (all round_to widths are grid points)"}
        }
    rng = random.Random(0)
    slowest = sorted({c[0] for c in candidates}, key=lambda n: -layers[n].full_ms)[:5]
    heavy = [c for c in candidates if c[0] in slowest]
    picks = rng.sample(heavy, min(count // 2, len(heavy)))
    rest = [c for c in candidates if c not in picks]
    picks += rng.sample(rest, min(count - len(picks), len(rest)))
    points = []
    for name, ci, co in picks:
        entry = layers[name]
        measured = timed(snippets[name], co if entry.depthwise else ci, co)
        linear = replace(entry, interpolation="linear").lookup(ci, co)
        points.append(
            {"layer": name, "c_in": ci, "c_out": co, "measured_ms": measured, "interpolated_ms": entry.lookup(ci, co),
             "linear_ms": linear}
        )  # fmt: skip
    result = {"points": points, "mode": next(iter(layers.values())).interpolation}
    for key, field_name in (("", "interpolated_ms"), ("linear_", "linear_ms")):
        errors = [(p[field_name] - p["measured_ms"]) / p["measured_ms"] for p in points if p["measured_ms"] > 0]
        result[f"{key}mean_abs_relative_error"] = float(np.mean(np.abs(errors)))
        result[f"{key}max_abs_relative_error"] = float(np.max(np.abs(errors)))
        result[f"{key}mean_relative_error"] = float(np.mean(errors))
        total = sum(p["measured_ms"] for p in points)
        result[f"{key}ms_weighted_abs_error"] = sum(abs(p[field_name] - p["measured_ms"]) for p in points) / total
    return {"interpolation": result}


# ---- TensorRT on the device: trtexec script and log parser ------------------------------------------
def write_trtexec_folder(
    subject: Subject,
    out: str | os.PathLike,
    round_to: int = 8,
    grid_points: int = 16,
    runs: int = 50,
    warmup_ms: int = 500,
    precision: str = "fp16",
    overwrite: bool = False,
    with_rest_terms: bool = True,
    rest_threshold: float = 0.01,
) -> Path:
    """Write onnx/<point>.onnx per layer snippet width (and onnx/model.onnx), run_trtexec.sh and snippets.json.

    Run `sh run_trtexec.sh` on the device (TRTEXEC=/usr/src/tensorrt/bin/trtexec on JetPack), then
    `altermoma latency-table --parse-trtexec DIR --out table.json`."""
    from common.io import check_replaceable, staged_directory

    if precision not in ("fp16", "fp32"):
        raise ValueError(f"--precision must be fp16 or fp32, got {precision!r}")
    if runs < 1 or warmup_ms < 0:
        raise ValueError("need runs >= 1 and a warm-up of >= 0 ms")
    check_replaceable(out, (TRT_KIND,), overwrite)
    graph, snippets, grids = plan(subject, round_to, grid_points)
    points: dict[str, dict[str, Any]] = {}
    signatures: dict[tuple[str, int, int], list[str]] = {}
    layers: dict[str, Any] = {}
    with staged_directory(out, kind=TRT_KIND) as folder:
        (folder / "onnx").mkdir()
        for k, (name, snippet) in enumerate(snippets.items()):
            depthwise = is_depthwise(snippet.layer)
            grid, ids = grids[name], []
            for ci in grid["in"]:
                row = []
                for co in grid["out"]:
                    key = (snippet.signature(), co if depthwise else ci, co)
                    if key not in signatures:
                        module, inputs = snippet.build(*key[1:])
                        call_ids = []
                        for c, x in enumerate(inputs):
                            point = f"l{k:03d}_{key[1]}x{key[2]}_c{c}"
                            (folder / "onnx" / f"{point}.onnx").write_bytes(onnx_bytes(module, [x]))
                            call_ids.append(point)
                        signatures[key] = call_ids
                    row.append(signatures[key])
                ids.append(row)
            c_in, c_out = layer_widths(snippet.layer)
            layers[name] = {
                "op": type(snippet.layer).__name__, "c_in": c_in, "c_out": c_out,
                "shapes": [[list(i), list(o)] for i, o in snippet.shapes], "grid_in": grid["in"],
                "grid_out": grid["out"], "snippet": snippet.parts, "depthwise": depthwise, "points": ids,
            }  # fmt: skip
        args, kwargs = subject.task.arguments(subject.example_batch)
        inputs = kwargs if kwargs else args
        export_onnx(subject.model, inputs, folder / "onnx" / "model.onnx", check=False)
        rest_terms = {}
        if with_rest_terms:
            for k, (root, n, kept) in enumerate(calibration_points(graph, round_to, grid_points)):
                model = pruned_copy(subject, root, n - kept)
                export_onnx(model, inputs, folder / "onnx" / f"rest{k:03d}.onnx", check=False)
                widths = {name: list(layer_widths(m)) for name, m in model.named_modules() if name in layers}
                rest_terms[root] = {"channels": n, "kept": kept, "point": f"rest{k:03d}", "widths": widths}
        for ids in signatures.values():
            points.update({p: {} for p in ids})
        settings = {
            "round_to": round_to, "grid_points": grid_points, "runs": runs, "warmup_ms": warmup_ms,
            "precision": precision, "statistic": "median of trtexec's GPU Compute Time",
            "interpolation": "ceil: between grid widths, the next grid width up; clamped at the grid's edges",
            "rest_threshold": rest_threshold,
        }  # fmt: skip
        manifest = {
            "layers": layers,
            "settings": settings,
            "model": model_info(subject, graph),
            "rest_terms": rest_terms,
        }
        manifest["host"] = environment(1, _batch_size(snippets))
        (folder / SNIPPETS).write_text(json.dumps(manifest, indent=1))
        runs_list = ["model", *points, *(t["point"] for t in rest_terms.values()), ("model", "model-again")]
        (folder / "run_trtexec.sh").write_text(trtexec_script(runs_list, runs, warmup_ms, precision))
    return Path(out)


def trtexec_script(points: list[str | tuple[str, str]], runs: int, warmup_ms: int, precision: str) -> str:
    """One trtexec run per graph (a (graph, log name) pair logs under another name: the model run twice
    measures the noise)."""
    flags = [f"--warmUp={warmup_ms}", f"--iterations={runs}", "--duration=0", "--noDataTransfers"]
    if precision == "fp16":
        flags.insert(0, "--fp16")
    lines = [
        "#!/bin/sh",
        "# Times every layer snippet with trtexec on this device; one log per graph in logs/.",
        "# Then: altermoma latency-table --parse-trtexec <this folder> --out table.json",
        "set -u",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        "mkdir -p logs",
        "run() {",
        f'  "$TRTEXEC" --onnx="onnx/$1.onnx" {" ".join(flags)} > "logs/${{2:-$1}}.log" 2>&1 || echo "trtexec failed: $1"',
        "}",
    ]
    lines += [f"run {' '.join(map(shlex.quote, p if isinstance(p, tuple) else (p,)))}" for p in points]
    return "\n".join(lines) + "\n"


GPU_COMPUTE = re.compile(r"GPU Compute Time:.*?median = ([0-9.eE+-]+) ms")


def parse_trtexec_log(text: str, source: str = "log") -> float:
    """Median of trtexec's "GPU Compute Time" summary line (ms)."""
    found = GPU_COMPUTE.findall(text)
    if not found:
        raise ValueError(f"{source} has no 'GPU Compute Time: ... median = X ms' line (did trtexec fail? see the log)")
    return float(found[-1])


def trtexec_environment(text: str) -> dict[str, Any]:
    """Device and TensorRT version from a trtexec log."""
    env: dict[str, Any] = {}
    for key, pattern in (
        ("device", r"Selected Device: (.+)"),
        ("compute_capability", r"Compute Capability: (.+)"),
        ("tensorrt", r"TensorRT version: (.+)"),
    ):
        match = re.search(pattern, text)
        if match:
            env[key] = match.group(1).strip()
    if "tensorrt" not in env and (match := re.search(r"\[TensorRT v(\d+)\]", text)):
        env["tensorrt"] = match.group(1)
    return env


def parse_trtexec_folder(folder: str | os.PathLike) -> LatencyTable:
    """The latency table from a folder written by `write_trtexec_folder` after its script ran on the device."""
    folder = Path(folder)
    manifest_path = folder / SNIPPETS
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} has no {SNIPPETS}: not a folder written by --backend trtexec-script")
    manifest = json.loads(manifest_path.read_text())

    def median(point: str) -> float:
        log = folder / "logs" / f"{point}.log"
        if not log.is_file():
            raise FileNotFoundError(f"{log} is missing: run {folder / 'run_trtexec.sh'} on the device first")
        return parse_trtexec_log(log.read_text(errors="replace"), str(log))

    layers = {}
    for name, spec in manifest["layers"].items():
        ms = [[sum(median(p) for p in ids) for ids in row] for row in spec.pop("points")]
        layers[name] = LayerEntry(**spec, ms=ms)
    model_log = (
        (folder / "logs" / "model.log").read_text(errors="replace") if (folder / "logs/model.log").is_file() else ""
    )
    e2e = median("model")
    full = sum(e.full_ms for e in layers.values())
    settings = manifest["settings"]
    terms, checks = {}, {}
    if manifest.get("rest_terms"):
        again = median("model-again")
        e2e = (e2e + again) / 2
        for root, t in manifest["rest_terms"].items():
            table_ms = sum(e.lookup(*t["widths"][name]) for name, e in layers.items())
            terms[root] = rest_term(t["channels"], t["kept"], median(t["point"]), e2e, table_ms, full)
        noise = abs(again - median("model"))
        checks["rest_terms"] = {
            "unpruned_ms": [median("model"), again],
            **choose_rest_terms(terms, noise, e2e, settings["rest_threshold"]),
        }
    env = {**trtexec_environment(model_log), "backend": f"tensorrt-{settings['precision']}", "host": manifest["host"]}
    return LatencyTable(
        backend=f"tensorrt-{settings['precision']}",
        layers=layers,
        end_to_end_ms=e2e,
        rest_ms=e2e - full,
        environment=env,
        settings=settings,
        model=manifest["model"],
        checks=checks,
        rest_terms=terms,
    )
