"""ONNX export of BEVFusion-style models: one graph, the CUDA-BEVFusion split, parity against PyTorch.

What an export does, in order (nothing is written at the destination until every step passed):

1. Refuse a destination whose directory does not exist (one line, before any work).
2. Trace with the TorchScript ("legacy") exporter, `dynamo=False`, static shapes, named inputs and
   outputs. The dynamo exporter needs `onnxscript` (not a dependency here) and lowers `index_add` to
   ScatterND-add, which TensorRT rejects (shared/notes/torch-pruning.md, "Export facts"); the legacy
   exporter gives a graph with nothing to fix for both pooling methods. Camera geometry and pooling
   indices are module buffers, so they become initializers: no argsort/unique/nonzero in the graph.
3. `onnx.checker.check_model`, then ONNX Runtime on the example inputs against PyTorch.
4. onnxslim, with constant folding limited to `SLIM_FOLD_LIMIT_BYTES` per folded tensor. Unlimited
   folding turns the scatter variant's `Expand` of the pooling indices into a (1, C, points) int64
   initializer: tiny grew 4.8 -> 6.6 MB, and r50 would get a 0.7 GB constant (80 channels x 1.1 M
   frustum points in the grid x 8 bytes). The simplified graph is kept only if it runs in ONNX Runtime and gives
   the unsimplified graph's outputs; otherwise the unsimplified one is kept and the reason recorded.
5. The TensorRT-readiness check (`export.trt_check`); with `check=True` any "error" finding aborts.
6. Atomic write (temporary file in the same directory, then `os.replace`): a failed export leaves no
   file behind and never clobbers an existing good one.

Measured on the 2-core CPU box (random weights, one thread): tiny exports in about 0.5 s per graph; r50
(6 x 256 x 704 images, 180 x 180 BEV) takes 74 s / 5.8 GB peak RSS / 151 MB with cumsum pooling and 59 s /
8.2 GB / 199 MB with scatter pooling (40 MB of that is the all-zero scatter canvas, which the tracer turns
into an initializer; ONNX Runtime also folds the expanded (1, 80, 1.1 M) int64 scatter indices at load).

`export_split` writes the NVIDIA CUDA-BEVFusion split (camera backbone + depth, view transform, LiDAR
backbone, fuser + decoder, heads) as separate graphs joined by named tensors; thin wrappers call the
model's own submodules. `OrtPipeline` runs one graph or chains the split graphs; `parity_report`
compares them with PyTorch (and, given a data set, compares detection metrics); `export_checkpoint`
does all of it for a checkpoint and writes `export_report.{json,md}`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common.io import atomic_write_bytes, atomic_write_text
from export import trt_check
from export.parity import compare_outputs

SINGLE = "model"  # key of the one-graph export in a mapping of ONNX paths
STAGES = ("camera_backbone", "camera_vtransform", "lidar_backbone", "fuser_decoder", "heads")
POOL_METHODS = ("scatter", "cumsum")
SLIM_FOLD_LIMIT_BYTES = 1 << 20  # onnxslim folds no constant larger than this (see the module docstring)
SLIM_RTOL = 1e-5  # simplified vs unsimplified outputs: max abs error <= SLIM_RTOL * max(1, |reference|max)
FP32_ATOL = 1e-4  # the fp32 parity target
# The cumsum form of BEV pooling computes each cell as a difference of two FP32 prefix sums over all frustum
# points of a channel, so its rounding grows with the prefix, not with the cell. ONNX Runtime's CumSum is
# less accurate than PyTorch's: on trained tiny camera checkpoints (8 val scenes) ORT vs PyTorch reached
# 2.6e-4 (bev_map, |ref| 11) and 1.4e-4 (heatmap) at step 500, 1.7e-4 / 7.6e-5 at step 1500, while
# PyTorch's own cumsum is within 4.3e-5 of an FP64 reference and scatter parity stays below 1e-5.
# Cumsum parity is therefore judged at this looser gate; reports still say whether 1e-4 was met. Larger
# rigs (r50: 1.1 M frustum points in the grid instead of 7.4 k) have larger prefixes: expect larger errors.
CUMSUM_ATOL = 1e-3


class ExportError(ValueError):
    """An export that must not be used: TensorRT-readiness errors, or a graph ONNX rejects."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `torch.set_num_threads(threads)`, restoring the previous count afterwards."""
    if threads is None:
        yield
        return
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def pool_method_as(model: nn.Module, method: str | None) -> Iterator[None]:
    """Temporarily switch the camera BEV pooling to "scatter" or "cumsum" (no-op for None or no camera)."""
    if method is not None and method not in POOL_METHODS:
        raise ValueError(f"pool_method must be one of {', '.join(POOL_METHODS)}, got {method!r}")
    camera = getattr(model, "camera", None)
    if method is None or camera is None:
        yield
        return
    pool = camera.vtransform.pool
    previous = pool.method
    pool.method = method
    try:
        yield
    finally:
        pool.method = previous


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def current_pool_method(model: nn.Module) -> str | None:
    camera = getattr(model, "camera", None)
    return None if camera is None else camera.vtransform.pool.method


def _check_destination(path: Path) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")


def _to_numpy(outputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy() for name, value in outputs.items()}


def _versions() -> dict[str, str]:
    import onnxslim

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "onnxslim": onnxslim.__version__,
    }


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Explicit threads (intra-op `threads`, inter-op 1), sequential execution, quiet log."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def ort_session(
    model: str | os.PathLike | onnx.ModelProto, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(source, session_options(threads), providers=list(providers))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type (top-level graph), most frequent first."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


# ----------------------------------------------------------------------------------------------------------
# The CUDA-BEVFusion split: thin wrappers around the model's own submodules


class CameraBackboneStage(nn.Module):
    """images (B, N, 3, H, W) -> depth (B*N, D, h, w) softmaxed over bins, context (B*N, C, h, w)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.camera = model.camera

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c, h, w = images.shape
        features = self.camera.neck(self.camera.backbone(images.view(b * n, c, h, w)))
        return self.camera.vtransform.depth_and_context(features)

    def owned_modules(self) -> list[nn.Module]:
        """The layers whose parameters this stage runs (the wrapper also holds the camera's view transform)."""
        vt = self.camera.vtransform
        return [self.camera.backbone, self.camera.neck, vt.depth_conv, vt.feat_conv]


class CameraVTransformStage(nn.Module):
    """depth, context -> camera_bev (B, C, Y, X): lift (outer product), BEV pool, BEV downsample."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vtransform = model.camera.vtransform

    def forward(self, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.vtransform.splat(depth, context)

    def owned_modules(self) -> list[nn.Module]:
        return [self.vtransform.pool, self.vtransform.downsample]


class LidarBackboneStage(nn.Module):
    """pillars, pillar_map -> lidar_bev (B, C, Y, X)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lidar = model.lidar

    def forward(self, pillars: torch.Tensor, pillar_map: torch.Tensor) -> torch.Tensor:
        return self.lidar(pillars, pillar_map)

    def owned_modules(self) -> list[nn.Module]:
        return [self.lidar]


class FuserDecoderStage(nn.Module):
    """camera_bev and/or lidar_bev -> bev_features (fuser when both exist, then the decoder)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fuser = model.fuser
        self.decoder = model.decoder

    def forward(self, camera_bev: torch.Tensor | None = None, lidar_bev: torch.Tensor | None = None) -> torch.Tensor:
        bev = [x for x in (camera_bev, lidar_bev) if x is not None]
        x = self.fuser(bev) if self.fuser is not None else bev[0]
        return self.decoder(x)

    def owned_modules(self) -> list[nn.Module]:
        return [m for m in (self.fuser, self.decoder) if m is not None]


class HeadsStage(nn.Module):
    """bev_features -> the head outputs (heatmap, offset, height, size, rotation[, bev_map])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.heads = model.heads

    def forward(self, bev_features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(bev_features)

    def owned_modules(self) -> list[nn.Module]:
        return [self.heads]


@dataclass
class Stage:
    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = self.module(**{name: tensors[name] for name in self.inputs})
        if isinstance(result, Mapping):
            return dict(result)
        result = result if isinstance(result, tuple) else (result,)
        return dict(zip(self.outputs, result))

    @property
    def params(self) -> int:
        """Parameters this stage runs; the stages of a model sum to all of its parameters."""
        return sum(p.numel() for m in self.module.owned_modules() for p in m.parameters())


def split_stages(model: nn.Module, head_outputs: Sequence[str]) -> list[Stage]:
    """The stages that apply to this model (camera-only and LiDAR-only models get a subset), in run order."""
    stages = []
    bev = []
    if model.camera is not None:
        stages.append(Stage("camera_backbone", CameraBackboneStage(model), ("images",), ("depth", "context")))
        stages.append(Stage("camera_vtransform", CameraVTransformStage(model), ("depth", "context"), ("camera_bev",)))
        bev.append("camera_bev")
    if model.lidar is not None:
        stages.append(Stage("lidar_backbone", LidarBackboneStage(model), ("pillars", "pillar_map"), ("lidar_bev",)))
        bev.append("lidar_bev")
    stages.append(Stage("fuser_decoder", FuserDecoderStage(model), tuple(bev), ("bev_features",)))
    stages.append(Stage("heads", HeadsStage(model), ("bev_features",), tuple(head_outputs)))
    for stage in stages:
        # A fresh wrapper says training=True; torch.onnx.export "restores" that mode recursively after
        # tracing, which would put the model's BatchNorms in training mode (and the next forward would
        # update their running statistics). Give the wrappers the model's own flag, not recursively.
        stage.module.training = model.training
    return stages


@torch.no_grad()
def stage_tensors(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[list[Stage], dict[str, torch.Tensor]]:
    """Run the split in PyTorch: the stages and every named tensor (model inputs, intermediates, outputs)."""
    head_outputs = list(model(**{name: inputs[name] for name in model.input_names}))
    stages = split_stages(model, head_outputs)
    tensors = {name: inputs[name] for name in model.input_names}
    for stage in stages:
        tensors.update(stage(tensors))
    return stages, tensors


# ----------------------------------------------------------------------------------------------------------
# Exporting one graph


def _max_scaled_error(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """Largest max-abs error over outputs, divided by max(1, |reference|max) of that output."""
    report = compare_outputs(reference, candidate, atol_fp32=np.inf)
    worst = 0.0
    for out in report.outputs.values():
        if out.nonfinite:
            return float("inf")
        worst = max(worst, out.max_abs / max(1.0, out.max_ref_abs))
    return worst


def _simplify(
    raw: onnx.ModelProto, feeds: Mapping[str, np.ndarray], raw_outputs: Mapping[str, np.ndarray], threads: int
) -> tuple[onnx.ModelProto | None, dict[str, np.ndarray], str]:
    """onnxslim the graph: (graph, its outputs on `feeds`, note), or (None, {}, why) if it fails, breaks the
    checker or changes the outputs."""
    import onnxslim

    try:
        candidate = onnx.ModelProto()
        candidate.CopyFrom(raw)  # onnxslim edits its input in place; the fallback must stay untouched
        slim = onnxslim.slim(candidate, size_threshold=SLIM_FOLD_LIMIT_BYTES)
        if slim is None:
            return None, {}, "onnxslim returned nothing"
        onnx.checker.check_model(slim)
        session = ort_session(slim, threads)
        names = [o.name for o in session.get_outputs()]
        if names != list(raw_outputs):
            return None, {}, f"onnxslim changed the outputs {list(raw_outputs)} -> {names}"
        outputs = dict(zip(names, session.run(None, dict(feeds))))
    except Exception as error:  # noqa: BLE001 - any failure means: keep the unsimplified graph
        reason = str(error).splitlines()[0] if str(error) else ""
        return None, {}, f"onnxslim failed: {type(error).__name__}: {reason}"
    error = _max_scaled_error(raw_outputs, outputs)
    if error > SLIM_RTOL:
        return None, {}, f"onnxslim changed the outputs (scaled max abs error {error:.2e} > {SLIM_RTOL:.0e})"
    return slim, outputs, "simplified with onnxslim"


def _export_graph(
    module: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    path: Path,
    *,
    opset: int,
    simplify: bool,
    check: bool,
    threads: int = 1,
    write: bool = True,
) -> dict[str, Any]:
    """Export `module(**inputs)` to `path` (see the module docstring for the steps). Returns the details;
    with `write=False` nothing is written and the graph's bytes are returned under "_bytes"."""
    path = Path(path)
    _check_destination(path)
    start = time.perf_counter()
    inputs = dict(inputs)
    feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
    with torch.no_grad():
        reference = module(**inputs)
    if not isinstance(reference, Mapping):
        reference = dict(zip(output_names, reference if isinstance(reference, tuple) else (reference,)))
    reference = _to_numpy(reference)
    if list(reference) != list(output_names):
        raise ValueError(f"module outputs {list(reference)} do not match output names {list(output_names)}")

    fd, raw_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".raw.tmp", dir=path.parent)
    os.close(fd)
    modes = {m: m.training for m in module.modules()}  # the exporter resets modes recursively: restore each
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                (),
                raw_tmp,
                kwargs=inputs,
                input_names=list(inputs),
                output_names=list(output_names),
                opset_version=int(opset),
                do_constant_folding=True,
                dynamo=False,
            )
        raw_size = os.path.getsize(raw_tmp)
        raw = onnx.load(raw_tmp)
    finally:
        Path(raw_tmp).unlink(missing_ok=True)
        for submodule, training in modes.items():
            submodule.training = training
    exporter_warnings = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    try:
        onnx.checker.check_model(raw)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{path.name}: the exported graph fails onnx.checker: {str(error).splitlines()[0]}") from None
    graph_inputs = [i.name for i in raw.graph.input]
    if graph_inputs != list(inputs):
        raise ExportError(f"{path.name}: graph inputs {graph_inputs} differ from {list(inputs)} (an unused input?)")

    session = ort_session(raw, threads)
    raw_outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    del session

    final, final_outputs, simplify_note = raw, raw_outputs, "not simplified (simplify=False)"
    if simplify:
        slim, slim_outputs, simplify_note = _simplify(raw, feeds, raw_outputs, threads)
        if slim is not None:
            final, final_outputs = slim, slim_outputs
    final_bytes = final.SerializeToString()

    findings = trt_check.check_model(final)
    errors = [f for f in findings if f.severity == trt_check.ERROR]
    if check and errors:
        detail = "; ".join(f"[{f.rule}] {f.node}: {f.message}" for f in errors[:3])
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ExportError(f"{path.name} is not TensorRT-ready, {len(errors)} error(s): {detail}{more}")

    parity = compare_outputs(reference, final_outputs, atol_fp32=FP32_ATOL)

    if write:
        atomic_write_bytes(path, final_bytes)
    return {
        **({} if write else {"_bytes": final_bytes}),
        "path": str(path),
        "opset": int(opset),
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "outputs": {name: list(value.shape) for name, value in reference.items()},
        "size_bytes_unsimplified": raw_size,
        "size_bytes": len(final_bytes),
        "simplified": final is not raw,
        "simplify_note": simplify_note,
        "nodes_unsimplified": len(raw.graph.node),
        "nodes": len(final.graph.node),
        "ops": op_histogram(final),
        "findings": [asdict(f) for f in findings],
        "readiness_errors": len(errors),
        "example_parity": parity.to_dict(),
        "exporter_warnings": exporter_warnings,
        "export_seconds": round(time.perf_counter() - start, 3),
    }


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    batch_size: int = 1,
    opset: int = 17,
    pool_method: str | None = None,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Export the whole model as one ONNX graph with static shapes.

    Inputs are named `model.input_names`, outputs by the forward dict's keys in order. `pool_method`
    ("scatter" | "cumsum") switches the BEV pooling for the export only. With `check=True` the export
    fails (`ExportError`, nothing written) when the TensorRT-readiness check finds an error. Returns the
    details: path, sizes before/after onnxslim, op histogram, findings, parity on the example inputs.
    """
    path = Path(path)
    _check_destination(path)
    from fusion.models.bevfusion import example_inputs

    if inputs is None:
        inputs = example_inputs(model.config, batch_size, model.modality)
    inputs = {name: inputs[name] for name in model.input_names}
    with eval_mode(model), pool_method_as(model, pool_method), torch_threads(threads):
        with torch.no_grad():
            output_names = list(model(**inputs))
        details = _export_graph(
            model, inputs, output_names, path, opset=opset, simplify=simplify, check=check, threads=threads
        )
        details["pool_method"] = current_pool_method(model)
    details["batch_size"] = int(next(iter(inputs.values())).shape[0])
    return details


def export_split_details(
    model: nn.Module,
    out_dir: str | os.PathLike,
    batch_size: int = 1,
    opset: int = 17,
    pool_method: str | None = None,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """`export_split`, returning each stage's export details (as `export_onnx`) instead of only paths."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output directory {out_dir} does not exist")
    from fusion.models.bevfusion import example_inputs

    if inputs is None:
        inputs = example_inputs(model.config, batch_size, model.modality)
    details = {}
    with eval_mode(model), pool_method_as(model, pool_method), torch_threads(threads):
        stages, tensors = stage_tensors(model, inputs)
        for stage in stages:
            stage_inputs = {name: tensors[name] for name in stage.inputs}
            result = _export_graph(
                stage.module,
                stage_inputs,
                stage.outputs,
                out_dir / f"{stage.name}.onnx",
                opset=opset,
                simplify=simplify,
                check=check,
                threads=threads,
                write=False,
            )
            result["pool_method"] = current_pool_method(model)
            details[stage.name] = result
    # Written only once every stage passed: a failure never leaves a mixed set of old and new stages.
    for result in details.values():
        atomic_write_bytes(result["path"], result.pop("_bytes"))
    return details


def export_split(
    model: nn.Module,
    out_dir: str | os.PathLike,
    batch_size: int = 1,
    opset: int = 17,
    pool_method: str | None = None,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
) -> dict[str, Path]:
    """The NVIDIA CUDA-BEVFusion split as `<out_dir>/<stage>.onnx`, joined by named tensors:

    camera_backbone: images -> depth, context; camera_vtransform: depth, context -> camera_bev;
    lidar_backbone: pillars, pillar_map -> lidar_bev; fuser_decoder: camera_bev, lidar_bev -> bev_features;
    heads: bev_features -> head outputs. Single-modal models get the stages that apply.
    """
    details = export_split_details(model, out_dir, batch_size, opset, pool_method, simplify, check, threads)
    return {name: Path(d["path"]) for name, d in details.items()}


# ----------------------------------------------------------------------------------------------------------
# Running exported graphs in ONNX Runtime


class OrtPipeline:
    """One ONNX graph, or the split graphs chained by tensor name, in ONNX Runtime.

    `paths` is a path (one graph), or a mapping: {"model": path} for one graph, {stage: path} for the split.
    Calling it takes numpy inputs at the graph's static batch size; `run_any_batch` chunks and pads other
    batch sizes; `torch_runner()` adapts it to `fusion.evaluate.evaluate` (torch tensors in and out).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Mapping[str, str | os.PathLike],
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ):
        if not isinstance(paths, Mapping):
            paths = {SINGLE: paths}
        if SINGLE in paths and len(paths) > 1:
            raise ValueError("give either the single graph ('model') or the split stages, not both")
        unknown = sorted(set(paths) - {SINGLE, *STAGES})
        if unknown:
            raise ValueError(f"unknown graph name(s) {unknown} (expected 'model' or {', '.join(STAGES)})")
        for name, path in paths.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"ONNX file for {name} not found: {path}")
        order = [SINGLE, *STAGES]
        self.sessions = {name: ort_session(paths[name], threads, providers) for name in sorted(paths, key=order.index)}
        produced: set[str] = set()
        self.input_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        for session in self.sessions.values():
            for value in session.get_inputs():
                if value.name not in produced and value.name not in self.input_names:
                    self.input_names.append(value.name)
                    self.input_shapes[value.name] = tuple(value.shape)
            produced.update(o.name for o in session.get_outputs())
        last = list(self.sessions.values())[-1]
        self.output_names = [o.name for o in last.get_outputs()]
        self.batch_size = int(self.input_shapes[self.input_names[0]][0])

    @property
    def is_split(self) -> bool:
        return SINGLE not in self.sessions

    def run_stage(self, name: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[name]
        feeds = {value.name: tensors[value.name] for value in session.get_inputs()}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: np.ascontiguousarray(inputs[name]) for name in self.input_names}
        for name in self.sessions:
            tensors.update(self.run_stage(name, tensors))
        return {name: tensors[name] for name in self.output_names}

    def run_any_batch(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Any batch size: chunks of the static batch, the last one padded by repeating its final sample."""
        arrays = {name: np.asarray(inputs[name]) for name in self.input_names}
        total = len(next(iter(arrays.values())))
        step = self.batch_size
        if total == step:
            return self(arrays)
        chunks = []
        for start in range(0, total, step):
            chunk = {name: a[start : start + step] for name, a in arrays.items()}
            short = step - len(next(iter(chunk.values())))
            if short:
                chunk = {name: np.concatenate([a, np.repeat(a[-1:], short, axis=0)]) for name, a in chunk.items()}
            out = self(chunk)
            chunks.append({name: v[: step - short] for name, v in out.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in self.output_names}

    def torch_runner(self) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """A callable for `fusion.evaluate.evaluate`: torch -> numpy -> ONNX Runtime -> torch."""

        def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            outputs = self.run_any_batch({name: inputs[name].cpu().numpy() for name in self.input_names})
            return {name: torch.from_numpy(value) for name, value in outputs.items()}

        return run


# ----------------------------------------------------------------------------------------------------------
# Parity


def _stack(runs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([np.asarray(r[name]) for r in runs]) for name in runs[0]}


def _metric_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    keys = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mIoU")
    return {k: float(metrics[k]) for k in keys if k in metrics}


def parity_report(
    model: nn.Module,
    onnx_paths: str | os.PathLike | Mapping[str, str | os.PathLike],
    samples: Sequence[Mapping[str, torch.Tensor]],
    threads: int = 1,
    *,
    pool_method: str | None = None,
    dataset: Any = None,
    eval_batch_size: int | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    """ONNX Runtime (CPU, `threads` intra-op threads) against PyTorch on `samples` (input dicts).

    `onnx_paths`: one path, or a mapping with "model" (the single graph) and/or the split stages. Per
    output max/mean abs error over all samples (`export.parity.compare_outputs`, fp32, `atol`) for the
    single graph and the chained split, and the chained split against the single graph. With `dataset`
    (a `SyntheticScenes`), detection/segmentation metrics through PyTorch and through each ORT pipeline.
    `pool_method` must be the one the graphs were exported with (the PyTorch reference uses it).
    `atol` defaults to FP32_ATOL (1e-4), or CUMSUM_ATOL for cumsum pooling (see there); "meets_fp32_target"
    says whether every error is within 1e-4 regardless.
    """
    if not samples:
        raise ValueError("parity needs at least one sample")
    if not isinstance(onnx_paths, Mapping):
        onnx_paths = {SINGLE: onnx_paths}
    pipelines: dict[str, OrtPipeline] = {}
    if SINGLE in onnx_paths:
        pipelines["single"] = OrtPipeline({SINGLE: onnx_paths[SINGLE]}, threads)
    split = {name: p for name, p in onnx_paths.items() if name != SINGLE}
    if split:
        pipelines["split"] = OrtPipeline(split, threads)
    result: dict[str, Any] = {"threads": int(threads), "samples": len(samples), "precision": "fp32"}
    with eval_mode(model), pool_method_as(model, pool_method), torch_threads(threads), torch.no_grad():
        result["pool_method"] = current_pool_method(model)
        if atol is None:
            atol = CUMSUM_ATOL if result["pool_method"] == "cumsum" else FP32_ATOL
        result["atol"] = atol
        reference = [_to_numpy(model(**{k: s[k] for k in model.input_names})) for s in samples]
        candidates = {}
        for label, pipeline in pipelines.items():
            candidates[label] = [
                pipeline.run_any_batch({k: s[k].cpu().numpy() for k in pipeline.input_names}) for s in samples
            ]
            report = compare_outputs(_stack(reference), _stack(candidates[label]), atol_fp32=atol)
            result[label] = report.to_dict()
        if "single" in candidates and "split" in candidates:
            report = compare_outputs(_stack(candidates["single"]), _stack(candidates["split"]), atol_fp32=atol)
            result["split_vs_single"] = report.to_dict()
        if dataset is not None:
            from fusion.evaluate import evaluate

            batch = eval_batch_size or max(p.batch_size for p in pipelines.values())
            metrics = {"torch": _metric_summary(evaluate(model, dataset, batch_size=batch, progress=False))}
            for label, pipeline in pipelines.items():
                metrics[label] = _metric_summary(evaluate(pipeline.torch_runner(), dataset, batch, progress=False))
            result["metrics"] = metrics
            result["mAP_equal"] = all(m["mAP"] == metrics["torch"]["mAP"] for m in metrics.values())
            result["metrics_scenes"] = len(dataset)
    compared = [k for k in ("single", "split", "split_vs_single") if k in result]
    result["ok"] = all(result[k]["ok"] for k in compared)
    result["max_abs"] = {k: max(o["max_abs"] for o in result[k]["outputs"].values()) for k in compared}
    result["meets_fp32_target"] = all(v <= FP32_ATOL for v in result["max_abs"].values())
    return result


# ----------------------------------------------------------------------------------------------------------
# Checkpoint -> ONNX files + report


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str | None = None,
    pool_method: str | None = None,
    opset: int = 17,
    samples: int = 8,
    simplify: bool = True,
    threads: int = 1,
    batch_size: int = 1,
    split: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint (pruned or not), export `model.onnx` and `split/<stage>.onnx`, check parity on
    `samples` synthetic val scenes, and write `export_report.json` + `export_report.md` in `out_dir`.

    Raises `CheckpointError` for a missing/corrupt checkpoint or one of another preset than `preset`,
    `ValueError` for bad arguments, `ExportError` when a graph is not TensorRT-ready.
    """
    from fusion.checkpoint import load_checkpoint
    from fusion.data.dataset import SyntheticScenes, collate, model_inputs

    if int(samples) < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pool_method is not None and pool_method not in POOL_METHODS:
        raise ValueError(f"pool_method must be one of {', '.join(POOL_METHODS)}, got {pool_method!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    model, meta = load_checkpoint(checkpoint_dir, expect_preset=preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    single = export_onnx(
        model, out_dir / "model.onnx", batch_size, opset, pool_method, simplify, check=True, threads=threads
    )
    paths: dict[str, Any] = {SINGLE: single["path"]}
    split_details: dict[str, Any] = {}
    if split:
        (out_dir / "split").mkdir(exist_ok=True)
        split_details = export_split_details(
            model, out_dir / "split", batch_size, opset, pool_method, simplify, check=True, threads=threads
        )
        paths.update({name: d["path"] for name, d in split_details.items()})
    dataset = SyntheticScenes(model.config, "val", num_scenes=int(samples), progress=False)
    sample_inputs = [model_inputs(collate([dataset[i]])) for i in range(len(dataset))]
    parity = parity_report(
        model, paths, sample_inputs, threads, pool_method=pool_method, dataset=dataset, eval_batch_size=batch_size
    )
    report = {
        "checkpoint": str(checkpoint_dir),
        "preset": model.config.preset,
        "modality": model.modality,
        "params": sum(p.numel() for p in model.parameters()),
        "pruned": bool(meta.get("pruning") or meta.get("pruned")),
        "opset": int(opset),
        "batch_size": int(batch_size),
        "pool_method": single["pool_method"],
        "threads": int(threads),
        "versions": _versions(),
        "single": single,
        "split": split_details,
        "parity": parity,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write_text(out_dir / "export_report.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "export_report.md", report_markdown(report))
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable export report."""
    lines = [
        f"# ONNX export: {report['checkpoint']}",
        "",
        f"- preset `{report['preset']}`, modality `{report['modality']}`, {report['params']:,} parameters"
        + (" (pruned)" if report.get("pruned") else ""),
        f"- opset {report['opset']}, batch {report['batch_size']}, static shapes, BEV pooling "
        f"`{report['pool_method']}`, legacy TorchScript exporter (dynamo=False)",
        f"- ONNX Runtime CPUExecutionProvider, intra_op_num_threads={report['threads']}, inter_op=1, sequential",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "## Graphs",
        "",
        "| graph | inputs | outputs | MiB before onnxslim | MiB after | nodes before | nodes after | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    graphs = {"model.onnx": report["single"], **{f"split/{k}.onnx": v for k, v in report["split"].items()}}
    for name, d in graphs.items():
        lines.append(
            f"| {name} | {', '.join(d['inputs'])} | {', '.join(d['outputs'])} | {_mib(d['size_bytes_unsimplified'])} "
            f"| {_mib(d['size_bytes'])} | {d['nodes_unsimplified']} | {d['nodes']} | {d['simplify_note']} |"
        )
    lines += ["", "## Op histogram (model.onnx)", "", "| op | count |", "| --- | ---: |"]
    lines += [f"| {op} | {n} |" for op, n in report["single"]["ops"].items()]
    lines += ["", "## TensorRT readiness", ""]
    for name, d in graphs.items():
        if not d["findings"]:
            lines.append(f"- {name}: no findings")
        for f in d["findings"]:
            lines.append(f"- {name}: {f['severity'].upper()} [{f['rule']}] {f['node']}: {f['message']}")
    parity = report["parity"]
    lines += [
        "",
        f"## Parity (fp32, atol {parity['atol']:.0e}, {parity['samples']} synthetic val scenes): "
        + ("OK" if parity["ok"] else "FAILED"),
        "",
        f"Largest error: {', '.join(f'{k} {v:.2e}' for k, v in parity['max_abs'].items())}; the fp32 target "
        f"1e-04 is {'met' if parity['meets_fp32_target'] else 'NOT met'}."
        + (
            " Cumsum pooling is judged at the looser CUMSUM_ATOL: its cells are differences of FP32 prefix sums, "
            "whose rounding PyTorch and ONNX Runtime accumulate differently."
            if parity["pool_method"] == "cumsum"
            else ""
        ),
        "",
        "| comparison | output | max abs | mean abs | max |ref| | ok |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    titles = {
        "single": "ORT model.onnx vs PyTorch",
        "split": "ORT split chain vs PyTorch",
        "split_vs_single": "split vs single (ORT)",
    }
    for key, title in titles.items():
        for name, out in parity.get(key, {}).get("outputs", {}).items():
            lines.append(
                f"| {title} | {name} | {out['max_abs']:.3e} | {out['mean_abs']:.3e} | {out['max_ref_abs']:.3e} "
                f"| {'yes' if out['ok'] else 'NO'} |"
            )
    if "metrics" in parity:
        lines += ["", f"## Metrics on {parity['metrics_scenes']} val scenes", ""]
        keys = list(parity["metrics"]["torch"])
        lines += ["| runtime | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for label, m in parity["metrics"].items():
            lines.append(f"| {label} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
        lines.append("")
        lines.append(f"mAP equal through PyTorch and ONNX Runtime: {'yes' if parity['mAP_equal'] else 'NO'}")
    return "\n".join(lines) + "\n"
