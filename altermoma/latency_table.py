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

from altermoma.bench import environment
from common.task import Task
from compress.latency import (
    VERDICTS,
    LatencyTable,
    LayerEntry,
    layer_widths,
    monotone_grid,
    prunable_dims,
    width_grid,
)
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
        hyper["groups"] = getattr(layer, "groups", 1)
        return json.dumps([self.parts, repr(sorted(hyper.items())), self.shapes, layer_widths(layer)])

    def build(self, c_in: int, c_out: int) -> tuple[nn.Module, list[torch.Tensor]]:
        """The snippet at widths (c_in, c_out) in eval mode, and one random input per call of the layer."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            first = nn.Linear(c_in, c_out, bias=layer.bias is not None)
        else:
            groups = layer.groups if c_in % layer.groups == 0 and c_out % layer.groups == 0 else 1  # grouped: kept
            kwargs = dict(
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=c_out if is_depthwise(layer) else groups,
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


class Timing:
    """Runs and times things on one backend. The builder asks it for runnables (a layer snippet at some
    widths, a whole model) and for their samples, interleaved; a test gives the builder a deterministic
    one instead, so that no test depends on the speed or the load of the machine it runs on."""

    def __init__(self, backend: str, threads: int, workdir: str | os.PathLike):
        if backend not in TIMED_BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(TIMED_BACKENDS)})")
        if backend == "torch-cuda":
            require_cuda()
        self.backend, self.threads, self.workdir = backend, threads, Path(workdir)

    def snippet(self, module: nn.Module, inputs: list[torch.Tensor]) -> Callable[[], Any]:
        """One call runs the snippet once on each input (one input per call of the layer in a forward)."""
        if self.backend == "ort-cpu":
            import onnxruntime as ort

            options = session_options(self.threads)
            sessions = [
                (ort.InferenceSession(onnx_bytes(module, [x]), options, providers=["CPUExecutionProvider"]),
                 {"x": x.numpy()})
                for x in inputs
            ]  # fmt: skip

            def run_ort() -> None:
                for session, feeds in sessions:
                    session.run(None, feeds)

            return run_ort
        if self.backend == "torch-cuda":
            gpu, xs = module.cuda(), [x.cuda() for x in inputs]

            def run_cuda() -> None:
                with torch.inference_mode():
                    for x in xs:
                        gpu(x)
                torch.cuda.synchronize()

            return run_cuda

        def run_torch() -> None:
            with torch.inference_mode():
                for x in inputs:
                    module(x)

        return run_torch

    def model(self, model: nn.Module, task: Task, example_batch: Any) -> Callable[[], Any]:
        return model_runner(model, task, example_batch, self.backend, self.threads, self.workdir)

    def samples(self, runners: list[Callable[[], Any]], warmup: int, rounds: int) -> list[list[float]]:
        """ms per call of each runner: `warmup` untimed calls each, then `rounds` rounds of one call of
        each, in an order rotated every round, so that load from another process falls on all alike."""
        for run in runners:
            for _ in range(warmup):
                run()
        samples: list[list[float]] = [[] for _ in runners]
        for r in range(rounds):
            for k in range(len(runners)):
                i = (k + r) % len(runners)
                start = time.perf_counter()
                runners[i]()
                samples[i].append((time.perf_counter() - start) * 1e3)
        return samples


def make_timing(backend: str, threads: int, workdir: str | os.PathLike) -> Timing:
    """The builder's timing when none is given (tests replace it with a deterministic one)."""
    return Timing(backend, threads, workdir)


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


# ---- robust statistics ------------------------------------------------------------------------------
SAMPLE_SIGMAS = 3.0  # a sample further than this many robust standard deviations from the median is dropped


@dataclass
class Estimate:
    """A measured quantity: the mean of the samples kept, its standard error, samples kept and dropped."""

    ms: float
    se: float
    kept: int
    dropped: int

    @property
    def relative_se(self) -> float:
        return self.se / self.ms if self.ms > 0 else math.inf


def robust_estimate(samples: list[float]) -> Estimate:
    """The mean of the samples within 3 robust standard deviations (1.4826 x MAD) of their median, with its
    standard error: a burst of load from another process lands in a few samples and is dropped."""
    x = np.asarray(samples, dtype=float)
    median = float(np.median(x))
    sigma = 1.4826 * float(np.median(np.abs(x - median)))
    kept = x[np.abs(x - median) <= SAMPLE_SIGMAS * sigma] if sigma > 0 else x[x == median]
    se = float(np.std(kept, ddof=1) / math.sqrt(len(kept))) if len(kept) > 1 else 0.0
    return Estimate(float(np.mean(kept)), se, int(len(kept)), int(len(x) - len(kept)))


# ---- rest terms ---------------------------------------------------------------------------------------
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
SLOWER_TOLERANCE = 0.10  # a narrower model may measure this much slower than the unpruned one (runtime layouts)


def term_bound_problem(term: dict, claimable_ms: float) -> str | None:
    """Why a measured rest term is impossible, or None: it claims to save more rest than was measured, or
    the narrower model measured clearly slower than the unpruned one (cost does not fall as width grows)."""
    slack = 3.0 * term.get("change_se_ms", 0.0)
    saving = -term["rest_change_ms"]
    if saving > claimable_ms + slack:
        return f"claims {saving:.2f} ms of rest saved, more than the {claimable_ms:.2f} ms measured outside the layers"
    slower = term["end_to_end_ms"] - term["unpruned_ms"]
    if slower > SLOWER_TOLERANCE * term["unpruned_ms"] + slack:
        return f"the model cut to {term['kept']} channels measured {slower:.2f} ms slower than the unpruned one"
    return None


def choose_rest_terms(terms: dict[str, dict], noise_ms: float, e2e_ms: float, floor: float) -> dict[str, Any]:
    """Mark the terms to use: savings that stand out among all groups, above their own noise, within bounds.

    Most groups move the rest by a millisecond or two either way (on small: median |change| 0.4 ms, all
    but one within 2.2 ms): ONNX Runtime picks other layouts and fusions at other widths, shifts that
    need not add up over groups (on one build of the small table, using all 40 terms under-predicted the
    pruned models by 7-9%; on the committed one, all terms and the outliers alone predict alike,
    reports/latency-target/rest-ablation-small.md) and that are the most exposed to load from other
    processes. Work that really scales with one group's channels and no conv carries (the LSS pooling
    over the context channels, -40 ms there) stands far out. A term is used when it saves (a narrower
    model's rest does not grow: cost does not fall as width grows), is within its bounds, is at least 3 of
    its own standard errors, and |change| is at least max(5 x 1.4826 x MAD of all changes, 3 x noise,
    `floor` x end to end)."""
    changes = np.array([t["rest_change_ms"] for t in terms.values()])
    spread = 1.4826 * float(np.median(np.abs(changes - np.median(changes)))) if len(changes) else 0.0
    threshold = max(OUTLIER_SIGMAS * spread, 3.0 * noise_ms, floor * e2e_ms)
    for t in terms.values():
        change = t["rest_change_ms"]
        t["used"] = bool(
            change < 0
            and -change >= threshold
            and -change >= 3.0 * t.get("change_se_ms", 0.0)
            and not t.get("out_of_bounds")
        )
    return {
        "noise_ms": noise_ms,
        "robust_spread_ms": spread,
        "threshold_ms": threshold,
        "rule": f"used when the rest falls by at least max({OUTLIER_SIGMAS:g} x 1.4826 x MAD of all groups' changes, "
        f"3 x noise, {floor:.1%} of end to end) and by 3 of its own standard errors, within the bounds; noise: the "
        "median standard error of the terms",
        "used": sorted(root for root, t in terms.items() if t["used"]),
    }


# ---- the quality verdict --------------------------------------------------------------------------------
# (noisy above, bad above): what each measurement of the build may reach
LIMITS = {
    "reference_spread": (0.05, 0.15),  # (max - min) / median of the unpruned model, measured through the build
    "layer_noise": (0.02, 0.05),  # standard error of the layers' entries, relative, weighted by their ms
    "monotone_adjustment": (0.03, 0.10),  # how far the monotone fit moved the entries, weighted by their ms
    "negative_rest": (0.05, 0.25),  # layers timed alone costing more than the whole model, share of it
}
LIMIT_TEXT = {
    "reference_spread": "the unpruned model varied by {:.1%} while the table was built",
    "layer_noise": "the layer entries' standard error is {:.1%} (ms-weighted)",
    "monotone_adjustment": "the monotone fit moved the entries by {:.1%} (ms-weighted): widths disagree with neighbours",
    "negative_rest": "the layers timed alone cost {:.1%} more than the whole model",
}


def judge(metrics: dict[str, float | None], problems: list[str]) -> dict[str, Any]:
    """The verdict: "bad" when a measurement passes its bad limit or a rest term is out of bounds, "noisy"
    when one passes its noisy limit, else "good"; with the reasons (one short clause each)."""
    verdict, reasons, checks = 0, [], []
    for key, (noisy, bad) in LIMITS.items():
        value = metrics.get(key)
        if value is None:
            checks.append(f"{key.replace('_', ' ')}: not measured")
            continue
        level = 2 if value > bad else 1 if value > noisy else 0
        text = LIMIT_TEXT[key].format(value)
        checks.append(text)
        if level:
            reasons.append(f"{text} ({'bad' if level == 2 else 'noisy'} above {bad if level == 2 else noisy:.0%})")
        verdict = max(verdict, level)
    if problems:
        verdict = 2
        reasons += problems
    return {"verdict": VERDICTS[verdict], "reasons": reasons, "checks": checks, "metrics": metrics,
            "limits": {k: {"noisy": v[0], "bad": v[1]} for k, v in LIMITS.items()}}  # fmt: skip


def reference_spread(values: list[float]) -> float | None:
    return (max(values) - min(values)) / float(np.median(values)) if len(values) > 1 else None


def monotone_fit(raw: list[list[float]]) -> tuple[list[list[float]], float]:
    """The monotone grid and how far it moved the raw one: sum |fit - raw| / sum raw."""
    fitted = monotone_grid(raw)
    moved = sum(abs(f - r) for fr, rr in zip(fitted, raw) for f, r in zip(fr, rr))
    total = sum(sum(row) for row in raw)
    return fitted, moved / total if total > 0 else 0.0


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


NEIGHBOUR_TOLERANCE = 0.10  # an entry this far (relative) from the monotone fit of its layer is timed again
REMEASURE_PASSES = 2
REFERENCE_CHECKS = 8  # the unpruned model is timed this many times while the layers are (plus start and end)
REFERENCE_ROUNDS = 5
REFERENCE_SECONDS, REFERENCE_MAX_ROUNDS = 0.2, 200


class Measurer:
    """The timing of one build: snippet points (cached by signature and widths), the unpruned model as the
    reference (its spread through the build is the table's first quality measure), and rest terms."""

    def __init__(self, timing: Timing, subject: Subject, warmup: int, runs: int, rest_runs: int = 20):
        self.timing, self.subject, self.warmup, self.runs, self.rest_runs = timing, subject, warmup, runs, rest_runs
        self.points: dict[tuple[str, int, int], Estimate] = {}
        self.remeasured: list[dict[str, Any]] = []
        self.reference_runner = timing.model(subject.model, subject.task, subject.example_batch)
        self.reference: list[dict[str, Any]] = []

    def check_reference(self, when: str, rounds: int = REFERENCE_ROUNDS) -> Estimate:
        """Time the unpruned model `rounds` times (more for a fast model: a check lasts about 0.2 s)."""
        if self.reference:
            rounds = max(
                rounds, min(REFERENCE_MAX_ROUNDS, math.ceil(REFERENCE_SECONDS * 1e3 / self.reference[0]["ms"]))
            )
        [samples] = self.timing.samples([self.reference_runner], 1 if self.reference else self.warmup, rounds)
        estimate = robust_estimate(samples)
        self.reference.append({"when": when, "ms": estimate.ms, "se_ms": estimate.se, "runs": rounds})
        return estimate

    def measure(self, wanted: list[tuple[Snippet, int, int]], again: bool = False) -> list[Estimate]:
        """Each (snippet, c_in, c_out) measured (or taken from the cache), the new ones interleaved."""
        keys = [(snippet.signature(), ci, co) for snippet, ci, co in wanted]
        todo = {k: w for k, w in zip(keys, wanted) if again or k not in self.points}
        if todo:
            runners = [self.timing.snippet(*snippet.build(ci, co)) for snippet, ci, co in todo.values()]
            for key, samples in zip(todo, self.timing.samples(runners, self.warmup, self.runs)):
                self.points[key] = robust_estimate(samples)
        return [self.points[k] for k in keys]

    def layer(self, snippet: Snippet, grid: dict[str, list[int]]) -> tuple[list[list[float]], dict[str, Any]]:
        """The layer's monotone grid, with its quality: entries that disagree with the monotone fit of the
        others by over 10% (and 3 standard errors) are timed again, twice at most."""
        depthwise = is_depthwise(snippet.layer)
        cells = [(i, j) for i in range(len(grid["in"])) for j in range(len(grid["out"]))]

        def wanted(i: int, j: int) -> tuple[Snippet, int, int]:
            co = grid["out"][j]
            return snippet, co if depthwise else grid["in"][i], co

        found = dict(zip(cells, self.measure([wanted(*c) for c in cells])))
        retimed = 0
        for _ in range(REMEASURE_PASSES):
            raw = [[found[(i, j)].ms for j in range(len(grid["out"]))] for i in range(len(grid["in"]))]
            fitted = monotone_grid(raw)
            suspects = [
                (i, j) for i, j in cells
                if abs(raw[i][j] - fitted[i][j]) > max(NEIGHBOUR_TOLERANCE * fitted[i][j], 3.0 * found[(i, j)].se)
            ]  # fmt: skip
            if not suspects:
                break
            retimed += len(suspects)
            for (i, j), estimate in zip(suspects, self.measure([wanted(*c) for c in suspects], again=True)):
                self.remeasured.append({"layer": snippet.name, "c_in": grid["in"][i], "c_out": grid["out"][j],
                                        "first_ms": found[(i, j)].ms, "again_ms": estimate.ms})  # fmt: skip
                found[(i, j)] = estimate
        raw = [[found[(i, j)].ms for j in range(len(grid["out"]))] for i in range(len(grid["in"]))]
        fitted, moved = monotone_fit(raw)
        noise = [found[c].relative_se for c in cells if math.isfinite(found[c].relative_se)]
        quality = {"noise": float(np.median(noise)) if noise else 0.0, "worst_noise": max(noise, default=0.0),
                   "monotone_adjustment": moved, "retimed": retimed,
                   "dropped_samples": sum(found[c].dropped for c in cells)}  # fmt: skip
        return fitted, quality

    def variant(self, model: nn.Module) -> Callable[[], Any]:
        return self.timing.model(model, self.subject.task, self.subject.example_batch)

    def term(self, runner: Callable[[], Any]) -> tuple[Estimate, Estimate]:
        """The change of the end-to-end time when the model is the variant `runner` runs instead of the
        unpruned one: the two timed alternately, the difference taken call by call (load from another
        process falls on both)."""
        ref, var = self.timing.samples([self.reference_runner, runner], self.warmup, self.rest_runs)
        reference = robust_estimate(ref)
        self.reference.append({"when": "beside a rest term", "ms": reference.ms, "se_ms": reference.se,
                               "runs": len(ref)})  # fmt: skip
        return robust_estimate([v - r for v, r in zip(var, ref)]), reference


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
    timing: Timing | None = None,
    rest_runs: int = 20,
) -> LatencyTable:
    """Time every layer snippet over its grid (and a few off-grid checks) and the model end to end; with
    `rest_terms`, also the model with each group cut to about a quarter (the rest's per-group slopes).
    The table carries its quality verdict (`table.quality`); building never refuses, its users do."""
    import tempfile

    if backend not in TIMED_BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(TIMED_BACKENDS)})")
    if backend == "torch-cuda":
        require_cuda()
    if threads < 1 or runs < 1 or rest_runs < 2 or warmup < 0 or round_to < 1 or grid_points < 2:
        raise ValueError(
            "need threads >= 1, runs >= 1, rest_runs >= 2, warmup >= 0, round_to >= 1 and grid_points >= 2"
        )
    say = progress or (lambda _text: None)
    start = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    graph, snippets, grids = plan(subject, round_to, grid_points)
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp, torch_threads(threads):
        timing = timing or make_timing(backend, threads, Path(workdir) if workdir is not None else Path(tmp))
        meter = Measurer(timing, subject, warmup, runs, rest_runs)
        first = meter.check_reference("start")
        say(f"unpruned model {first.ms:.2f} ms (timed {REFERENCE_CHECKS + 2} times through the build: the reference)")
        layers, layer_quality = {}, {}
        every = max(1, math.ceil(len(snippets) / REFERENCE_CHECKS))
        for k, (name, snippet) in enumerate(snippets.items()):
            grid = grids[name]
            ms, layer_quality[name] = meter.layer(snippet, grid)
            c_in, c_out = layer_widths(snippet.layer)
            shapes = [[list(i), list(o)] for i, o in snippet.shapes]
            layers[name] = LayerEntry(
                type(snippet.layer).__name__, c_in, c_out, shapes, grid["in"], grid["out"], ms, snippet.parts,
                is_depthwise(snippet.layer),
            )  # fmt: skip
            say(f"[{k + 1}/{len(snippets)}] {name}: {len(grid['in'])}x{len(grid['out'])} widths, full {ms[-1][-1]:.3f} "
                f"ms, noise {layer_quality[name]['noise']:.1%}")  # fmt: skip
            if (k + 1) % every == 0 and k + 1 < len(snippets):
                meter.check_reference(f"after {k + 1} layers")
        checks = interpolation_check(snippets, layers, meter, round_to, check_points)
        check = checks["interpolation"]
        if check.get("linear_ms_weighted_abs_error", math.inf) < check.get("ms_weighted_abs_error", math.inf):
            for entry in layers.values():  # this backend's costs are smooth rather than stepped: interpolate
                entry.interpolation = "linear"
            check["chosen"] = "linear (it measured the smaller ms-weighted error)"
        elif "points" in check and check["points"]:
            check["chosen"] = "ceil (it measured the smaller ms-weighted error)"
        checks["retimed"] = {"rule": "an entry over 10% (and 3 standard errors) off the monotone fit of its layer's "
                             "other entries is timed again, twice at most; the new time replaces it",
                             "points": meter.remeasured}  # fmt: skip
        full = sum(e.full_ms for e in layers.values())
        e2e_runs = max(runs, end_to_end_runs)
        e2e_first = meter.check_reference("end to end", e2e_runs)
        say(f"end to end {e2e_first.ms:.2f} ms, table at full width {full:.2f} ms, rest {e2e_first.ms - full:.2f} ms")
        terms: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        spread = reference_spread([r["ms"] for r in meter.reference])
        if rest_terms and spread is not None and spread > LIMITS["reference_spread"][1]:
            # the table is bad whatever the rest terms say: do not spend minutes timing them
            problems.append(f"rest terms not timed: the unpruned model had already varied by {spread:.1%}")
            say(f"skipping the rest terms: {problems[-1]}")
        elif rest_terms:
            e2e_now = float(np.median([r["ms"] for r in meter.reference]))
            terms, problems = measure_rest_terms(meter, subject, graph, layers, round_to, grid_points, e2e_now, say)
        meter.check_reference("end")
    e2e = float(np.median([r["ms"] for r in meter.reference]))
    if terms:
        checks["rest_terms"] = {
            "unpruned_ms": [r["ms"] for r in meter.reference if r["when"] == "beside a rest term"],
            **choose_rest_terms(terms, float(np.median([t["change_se_ms"] for t in terms.values()])), e2e,
                                rest_threshold),
        }  # fmt: skip
        checks["rest_terms"]["unpruned_spread"] = reference_spread(checks["rest_terms"]["unpruned_ms"])
    quality = build_quality(layers, layer_quality, meter.reference, e2e, problems)
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
            "rest_runs": rest_runs,
            "rest_terms": "per group, measured" if rest_terms else "none: the rest is a constant",
            "statistic": f"mean of the samples within {SAMPLE_SIGMAS:g} robust standard deviations of their median; "
            "the points of a layer timed in interleaved rounds; each layer's grid fitted monotone (isotonic)",
            "interpolation": "between grid widths, the next grid width up (ceil) or bilinear, whichever measured "
            "the smaller error on the off-grid checks (ceil without checks); clamped at the grid's edges",
            "snippet": "the layer + the BatchNorm and activation module that consume its output in the model",
            "distinct_points_timed": len(meter.points),
            "seconds": round(time.perf_counter() - start, 1),
        },
        model=model_info(subject, graph),
        checks=checks,
        rest_terms=terms,
        quality=quality,
    )


def measure_rest_terms(
    meter: Measurer,
    subject: Subject,
    graph: ChannelGraph,
    layers: dict[str, LayerEntry],
    round_to: int,
    grid_points: int,
    e2e_ms: float,
    say: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each group's rest term, within its bounds: a term that claims the impossible is timed again (twice at
    most; the first measurement within bounds stays); one still out of bounds is kept unused and named."""
    full = sum(e.full_ms for e in layers.values())
    claimable = max(e2e_ms - full, 0.0)
    terms, problems = {}, []
    for root, n, kept in calibration_points(graph, round_to, grid_points):
        model = pruned_copy(subject, root, n - kept)
        table_ms = table_ms_of(model, layers)
        runner = meter.variant(model)
        for attempt in range(1 + REMEASURE_PASSES):
            change, reference = meter.term(runner)
            term = rest_term(n, kept, reference.ms + change.ms, reference.ms, table_ms, full)
            term.update(change_se_ms=change.se, attempts=attempt + 1)
            problem = term_bound_problem(term, claimable)
            if problem is None:
                break
            say(f"rest term {root}: {problem}; timing it again")
        if problem is not None:
            term["out_of_bounds"] = problem
            problems.append(f"rest term {root} {problem} (3 times)")
        terms[root] = term
        say(f"rest term {root}: {n} -> {kept} channels, rest change {term['rest_change_ms']:+.2f} "
            f"+- {change.se:.2f} ms")  # fmt: skip
    return terms, problems


def build_quality(
    layers: dict[str, LayerEntry],
    layer_quality: dict[str, dict[str, Any]],
    reference: list[dict[str, Any]],
    e2e_ms: float,
    problems: list[str],
) -> dict[str, Any]:
    """The table's verdict from what the build measured (see `LIMITS`)."""
    weights = {name: max(entry.full_ms, 0.0) for name, entry in layers.items()}
    total = sum(weights.values()) or 1.0
    full = sum(e.full_ms for e in layers.values())
    metrics = {
        "reference_spread": reference_spread([r["ms"] for r in reference]),
        "layer_noise": sum(weights[n] * q["noise"] for n, q in layer_quality.items()) / total,
        "monotone_adjustment": sum(weights[n] * q["monotone_adjustment"] for n, q in layer_quality.items()) / total,
        "negative_rest": max(0.0, (full - e2e_ms) / e2e_ms) if e2e_ms > 0 else None,
    }
    quality = judge(metrics, problems)
    worst = sorted(layer_quality, key=lambda n: -weights[n] * layer_quality[n]["noise"])[:5]
    quality.update(
        reference=reference,
        noisiest_layers={n: layer_quality[n] for n in worst},
        layers=layer_quality,
    )
    return quality


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
    snippets: dict[str, Snippet], layers: dict[str, LayerEntry], meter: Measurer, round_to: int, count: int
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
    wanted = [(snippets[n], co if layers[n].depthwise else ci, co) for n, ci, co in picks]
    points = []
    for (name, ci, co), measured in zip(picks, meter.measure(wanted)):
        entry = layers[name]
        linear = replace(entry, interpolation="linear").lookup(ci, co)
        points.append(
            {"layer": name, "c_in": ci, "c_out": co, "measured_ms": measured.ms, "interpolated_ms": entry.lookup(ci, co),
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

    layers, layer_quality = {}, {}
    for name, spec in manifest["layers"].items():
        raw = [[sum(median(p) for p in ids) for ids in row] for row in spec.pop("points")]
        ms, moved = monotone_fit(raw)
        layers[name] = LayerEntry(**spec, ms=ms)
        layer_quality[name] = {"noise": 0.0, "monotone_adjustment": moved, "note": "trtexec medians: noise not known"}
    model_log = (
        (folder / "logs" / "model.log").read_text(errors="replace") if (folder / "logs/model.log").is_file() else ""
    )
    e2e = median("model")
    full = sum(e.full_ms for e in layers.values())
    settings = manifest["settings"]
    terms, checks, problems = {}, {}, []
    reference = [{"when": "start", "ms": e2e}]
    if manifest.get("rest_terms"):
        again = median("model-again")
        reference.append({"when": "end", "ms": again})
        e2e = (e2e + again) / 2
        for root, t in manifest["rest_terms"].items():
            table_ms = sum(e.lookup(*t["widths"][name]) for name, e in layers.items())
            terms[root] = rest_term(t["channels"], t["kept"], median(t["point"]), e2e, table_ms, full)
            problem = term_bound_problem(terms[root], max(e2e - full, 0.0))
            if problem is not None:
                terms[root]["out_of_bounds"] = problem
                problems.append(f"rest term {root} {problem}")
        noise = abs(again - median("model"))
        checks["rest_terms"] = {
            "unpruned_ms": [median("model"), again],
            **choose_rest_terms(terms, noise, e2e, settings["rest_threshold"]),
        }
    quality = build_quality(layers, layer_quality, reference, e2e, problems)
    quality["metrics"]["layer_noise"] = None  # one median per point: not measured
    quality.update(judge(quality["metrics"], problems))
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
        quality=quality,
    )
