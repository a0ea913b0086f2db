"""ONNX export of any `nn.Module`: one graph, or a split into stages joined by named tensors, with parity.

What an export does, in order (nothing is written at the destination until every step passed):

1. Refuse a destination whose directory does not exist (one line, before any work).
2. Trace with the TorchScript ("legacy") exporter, `dynamo=False`, static shapes, named inputs and
   outputs. The dynamo exporter needs `onnxscript` (not a dependency here) and lowers `index_add` to
   ScatterND-add, which TensorRT rejects (shared/notes/torch-pruning.md, "Export facts"); the legacy
   exporter gives the reference model a graph with nothing to fix for both pooling methods (its camera
   geometry and pooling indices are module buffers, so they become initializers: no argsort/unique/nonzero).
   An opset that cannot express the graph fails here, as an `ExportError`.
3. `onnx.checker.check_model`, then ONNX Runtime on the example inputs against PyTorch.
4. onnxslim, with constant folding limited to `SLIM_FOLD_LIMIT_BYTES` per folded tensor. Unlimited
   folding turns the scatter variant's `Expand` of the pooling indices into a (1, C, points) int64
   initializer: tiny grew 4.8 -> 6.6 MB, and r50 would get a 0.7 GB constant (80 channels x 1.1 M
   frustum points in the grid x 8 bytes). The simplified graph is kept only if it runs in ONNX Runtime and gives
   the unsimplified graph's outputs; otherwise the unsimplified one is kept and the reason recorded.
5. The TensorRT-readiness check (`export.trt_check`); with `check=True` any "error" finding aborts.
6. Atomic write (temporary file in the same directory, then `os.replace`): a failed export leaves no
   file behind and never clobbers an existing good one.

Measured on the 2-core CPU box (random weights, one thread): the reference BEVFusion tiny exports in about
0.5 s per graph; r50 (6 x 256 x 704 images, 180 x 180 BEV) takes 74 s / 5.8 GB peak RSS / 151 MB with cumsum
pooling and 59 s / 8.2 GB / 199 MB with scatter pooling (40 MB of that is the all-zero scatter canvas, which
the tracer turns into an initializer; ONNX Runtime also folds the expanded (1, 80, 1.1 M) int64 scatter
indices at load).

`export_onnx` exports one graph. `export_split` exports stages a model declares (`Stage`, or
`(name, module, inputs, outputs)` tuples, in run order) as separate graphs joined by named tensors; the
reference model's CUDA-BEVFusion split comes from `BEVFusion.export_stages`. `OrtPipeline` runs one graph or
chains the stage graphs; `parity_report` compares them with PyTorch and, given a metrics callable, compares
task metrics. Nothing here knows the reference model: `altermoma.export_reference` wires it up for a checkpoint.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common.io import atomic_write_bytes
from export import trt_check
from export.parity import compare_outputs

SINGLE = "model"  # key of the one-graph export in a mapping of ONNX paths
SLIM_FOLD_LIMIT_BYTES = 1 << 20  # onnxslim folds no constant larger than this (see the module docstring)
SLIM_RTOL = 1e-5  # simplified vs unsimplified outputs: max abs error <= SLIM_RTOL * max(1, |reference|max)
FP32_ATOL = 1e-4  # the fp32 parity target

# What `export_onnx` takes as example inputs: positional tensors, keyword tensors, or one tensor.
ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
Runner = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


class ExportError(ValueError):
    """An export that must not be used: the exporter failed, ONNX rejects the graph, or it is not TensorRT-ready."""


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
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets its own flag back (a model may mix modes)."""
    modes = {m: m.training for module in modules for m in module.modules()}
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def has_quantizers(model: nn.Module) -> bool:
    """Whether `model` holds ModelOpt fake-quant modules (`export.quantize`): its graph gets Q/DQ pairs."""
    return any(type(m).__module__.startswith("modelopt.") for m in model.modules())


QDQ_SIMPLIFY_NOTE = "not simplified: a Q/DQ graph (onnxslim folds the weights' Q/DQ into float constants)"


def _check_destination(path: Path) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")


def _to_numpy(outputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().cpu().numpy() for name, value in outputs.items()}


def versions() -> dict[str, str]:
    """Versions of the packages an export depends on, for reports."""
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
# Inputs and outputs of any module, by name

_OUTPUT_FORMS = "a tensor, a tuple/list of tensors or a flat dict of tensors"


def _names(kind: str, given: Sequence[str] | None, default: list[str]) -> list[str]:
    """`given` (checked: one string per value, no repeats) or `default`."""
    if given is None:
        return default
    if isinstance(given, str):
        given = [given]
    names = list(given)
    if len(names) != len(default):
        raise ValueError(f"{len(names)} {kind} name(s) given for {len(default)} {kind}(s): {names}")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be distinct non-empty strings, got {names}")
    return names


def named_inputs(
    example_inputs: ExampleInputs, input_names: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[int | str]]:
    """The example inputs as graph-named tensors, and for each how the model takes it: a position or a keyword.

    Names default to the dict keys (keyword inputs) or `input_0, input_1, ...` (positional inputs).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        keys: list[int | str] = list(example_inputs)
        values = list(example_inputs.values())
        default = [str(k) for k in keys]
    elif isinstance(example_inputs, (tuple, list)):
        keys = list(range(len(example_inputs)))
        values = list(example_inputs)
        default = [f"input_{i}" for i in keys]
    else:
        raise ValueError(
            f"example inputs must be a tensor, a tuple/list or a dict of tensors, not {type(example_inputs).__name__}"
        )
    if not values:
        raise ValueError("export needs at least one example input tensor")
    for key, value in zip(default, values):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"example input {key!r} is a {type(value).__name__}, not a tensor")
    names = _names("input", input_names, default)
    return dict(zip(names, values)), keys


def named_outputs(outputs: Any, output_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A model's outputs by graph name: the dict keys, else `output` (one tensor) or `output_0, ...`."""
    if isinstance(outputs, torch.Tensor):
        values, default = [outputs], ["output"]
    elif isinstance(outputs, Mapping):
        values, default = list(outputs.values()), [str(k) for k in outputs]
    elif isinstance(outputs, (tuple, list)):
        values, default = list(outputs), [f"output_{i}" for i in range(len(outputs))]
    else:
        raise ValueError(f"the model returned a {type(outputs).__name__}; export needs {_OUTPUT_FORMS}")
    if not values:
        raise ValueError(f"the model returned no outputs; export needs {_OUTPUT_FORMS}")
    for key, value in zip(default, values):
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"model output {key!r} is a {type(value).__name__}, not a tensor; export needs {_OUTPUT_FORMS}"
            )
    return dict(zip(_names("output", output_names, default), values))


class _ArgsAdapter(nn.Module):
    """Takes the graph inputs positionally, in graph order, and calls `model` with its own positions and keywords.

    Needed because the legacy exporter orders keyword inputs by the forward signature (not by the names
    given) and drops any that go to `**kwargs`. The graph's node and weight names gain a "model." prefix.
    """

    def __init__(self, model: nn.Module, keys: Sequence[int | str]):
        super().__init__()
        self.model = model
        self.keys = list(keys)
        self.training = model.training  # not recursive: the model's submodules keep their own flags

    def forward(self, *tensors: torch.Tensor) -> Any:
        args = [t for t, key in zip(tensors, self.keys) if isinstance(key, int)]
        kwargs = {key: t for t, key in zip(tensors, self.keys) if isinstance(key, str)}
        return self.model(*args, **kwargs)


def _harmless_default(p: inspect.Parameter) -> bool:
    """Whether the legacy exporter's handling of a parameter it got no input for changes nothing: it skips
    *args / **kwargs and passes every other default positionally, harmless only for a positional None."""
    if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return True
    return p.kind != inspect.Parameter.KEYWORD_ONLY and p.default is None


def _legacy_keeps_order(model: nn.Module, keys: Sequence[int | str]) -> bool:
    """Whether the legacy exporter passes these inputs to `model.forward` as they are, in order.

    It moves keyword inputs into signature order and fills the remaining parameters with their defaults;
    that is harmless when the keywords already follow the signature and every filled-in default is None.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if isinstance(keys[0], int):
        head = params[: len(keys)]
        if not any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in head):
            if len(head) < len(keys) or any(p.kind not in positional for p in head):
                return False
        return all(_harmless_default(p) for p in params[len(keys) :])
    order = []
    for p in params:
        if p.name in keys and p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
            order.append(p.name)
        elif not _harmless_default(p):
            return False
    return order == list(keys)


@dataclass
class _Traceable:
    """A module and its example inputs in the form the legacy exporter traces correctly."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    input_names: list[str]

    @classmethod
    def build(cls, model: nn.Module, example_inputs: ExampleInputs, input_names: Sequence[str] | None) -> _Traceable:
        inputs, keys = named_inputs(example_inputs, input_names)
        names, values = list(inputs), list(inputs.values())
        if not _legacy_keeps_order(model, keys):
            return cls(_ArgsAdapter(model, keys), tuple(values), {}, names)
        if isinstance(keys[0], int):
            return cls(model, tuple(values), {}, names)
        return cls(model, (), dict(zip(keys, values)), names)  # the exporter's keyword path: unprefixed names

    def __call__(self) -> Any:
        return self.module(*self.args, **self.kwargs)

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, [*self.args, *self.kwargs.values()]))


# ----------------------------------------------------------------------------------------------------------
# Stages a model declares


@dataclass
class Stage:
    """One graph of a split export: `module(**{input: tensor})` produces the named `outputs`, in order."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return named_outputs(self.module(**{name: tensors[name] for name in self.inputs}), self.outputs)

    @property
    def params(self) -> int:
        """Parameters this stage runs: its module's `owned_modules()` when it has one (a wrapper may hold more
        of the model than it runs), else all of the module's parameters."""
        owned = getattr(self.module, "owned_modules", None)
        modules = owned() if callable(owned) else [self.module]
        return sum(p.numel() for m in modules for p in m.parameters())


StageLike = Stage | tuple[str, nn.Module, Sequence[str], Sequence[str]]


def as_stages(stages: Iterable[StageLike]) -> list[Stage]:
    """`Stage`s from stages or `(name, module, input_names, output_names)` tuples, in the order given (run order)."""
    result = []
    for stage in stages:
        if not isinstance(stage, Stage):
            name, module, inputs, outputs = stage
            stage = Stage(str(name), module, tuple(inputs), tuple(outputs))
        if not stage.name or stage.name == SINGLE or Path(stage.name).name != stage.name:
            raise ValueError(f"stage name {stage.name!r} must be a plain file name other than {SINGLE!r}")
        result.append(stage)
    names = [s.name for s in result]
    if not result:
        raise ValueError("no stages given")
    if len(set(names)) != len(names):
        raise ValueError(f"stages need distinct names, got {names}")
    return result


@torch.no_grad()
def stage_tensors(stages: Iterable[StageLike], inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the stages in order in PyTorch: every named tensor (the inputs, intermediates and outputs)."""
    tensors = dict(inputs)
    for stage in as_stages(stages):
        missing = [name for name in stage.inputs if name not in tensors]
        if missing:
            raise ValueError(
                f"stage {stage.name!r} needs {missing}, which neither the inputs nor an earlier stage give"
            )
        tensors.update(stage(tensors))
    return tensors


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
    traceable: _Traceable,
    path: Path,
    *,
    output_names: Sequence[str] | None,
    opset: int,
    simplify: bool,
    check: bool,
    threads: int = 1,
    write: bool = True,
) -> dict[str, Any]:
    """Export `traceable` to `path` (see the module docstring for the steps). Returns the details;
    with `write=False` nothing is written and the graph's bytes are returned under "_bytes".

    A model with ModelOpt quantizers exports as a Q/DQ graph: never simplified (onnxslim would fold the
    weights' QuantizeLinear/DequantizeLinear into float constants) and judged at the "int8-qdq" tolerance."""
    path = Path(path)
    _check_destination(path)
    start = time.perf_counter()
    inputs = traceable.inputs
    feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}
    with torch.no_grad():
        reference = _to_numpy(named_outputs(traceable(), output_names))
    output_names = list(reference)

    fd, raw_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".raw.tmp", dir=path.parent)
    os.close(fd)
    module = traceable.module
    modes = {m: m.training for m in module.modules()}  # the exporter resets modes recursively: restore each
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    module,
                    traceable.args,
                    raw_tmp,
                    kwargs=traceable.kwargs or None,
                    input_names=list(inputs),
                    output_names=output_names,
                    opset_version=int(opset),
                    do_constant_folding=True,
                    dynamo=False,
                )
            except Exception as error:  # noqa: BLE001 - unsupported op or opset: one line, nothing written
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ExportError(
                    f"{path.name}: torch.onnx.export failed at opset {opset}: {type(error).__name__}: {reason}"
                ) from error
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
    quantized = has_quantizers(module)
    if quantized:
        simplify_note = QDQ_SIMPLIFY_NOTE
    elif simplify:
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

    parity = compare_outputs(
        reference, final_outputs, precision="int8-qdq" if quantized else "fp32", atol_fp32=FP32_ATOL
    )

    if write:
        atomic_write_bytes(path, final_bytes)
    return {
        **({} if write else {"_bytes": final_bytes}),
        "path": str(path),
        "opset": int(opset),
        "input_names": list(inputs),
        "output_names": output_names,
        "inputs": {name: list(value.shape) for name, value in inputs.items()},
        "outputs": {name: list(value.shape) for name, value in reference.items()},
        "checker": "ok",
        "size_bytes_unsimplified": raw_size,
        "size_bytes": len(final_bytes),
        "simplified": final is not raw,
        "simplify_note": simplify_note,
        "nodes_unsimplified": len(raw.graph.node),
        "nodes": len(final.graph.node),
        "ops": op_histogram(final),
        "quantized": quantized,
        "findings": [asdict(f) for f in findings],
        "readiness_errors": len(errors),
        "parity": parity.to_dict(),
        "max_abs_error": max(out.max_abs for out in parity.outputs.values()),
        "exporter_warnings": exporter_warnings,
        "export_seconds": round(time.perf_counter() - start, 3),
    }


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = 17,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Export `model(*example_inputs)` (tuple/list or one tensor) or `model(**example_inputs)` (dict) as one
    ONNX graph with static shapes, in eval mode (the model's modes are restored afterwards).

    Input names default to the dict keys or `input_0, ...`; output names to the output dict's keys, else
    `output` (one tensor) or `output_0, ...`; given names must match in number (ValueError). Outputs must
    be a tensor, a tuple/list of tensors or a flat dict of tensors (ValueError otherwise). With `check=True`
    the export fails (`ExportError`, nothing written) when the TensorRT-readiness check finds an error.
    Returns the details: path, names, shapes, sizes before/after onnxslim, op histogram, readiness findings,
    and "parity" / "max_abs_error": ONNX Runtime against PyTorch on the example inputs.
    """
    path = Path(path)
    _check_destination(path)
    with eval_mode(model), torch_threads(threads):
        traceable = _Traceable.build(model, example_inputs, input_names)
        return _export_graph(
            traceable,
            path,
            output_names=output_names,
            opset=opset,
            simplify=simplify,
            check=check,
            threads=threads,
        )


def export_split_details(
    stages: Iterable[StageLike],
    example_inputs: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    opset: int = 17,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """`export_split`, returning each stage's export details (as `export_onnx`) instead of only paths."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output directory {out_dir} does not exist")
    stages = as_stages(stages)
    details = {}
    with eval_mode(*[stage.module for stage in stages]), torch_threads(threads):
        tensors = stage_tensors(stages, example_inputs)
        for stage in stages:
            traceable = _Traceable.build(stage.module, {name: tensors[name] for name in stage.inputs}, None)
            details[stage.name] = _export_graph(
                traceable,
                out_dir / f"{stage.name}.onnx",
                output_names=stage.outputs,
                opset=opset,
                simplify=simplify,
                check=check,
                threads=threads,
                write=False,
            )
    # Written only once every stage passed: a failure never leaves a mixed set of old and new stages.
    for result in details.values():
        atomic_write_bytes(result["path"], result.pop("_bytes"))
    return details


def export_split(
    stages: Iterable[StageLike],
    example_inputs: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    opset: int = 17,
    simplify: bool = True,
    check: bool = True,
    threads: int = 1,
) -> dict[str, Path]:
    """Each stage as `<out_dir>/<stage>.onnx`, in run order, joined by tensor names: a stage's inputs are model
    inputs (keys of `example_inputs`) or outputs of earlier stages. The graphs are traced on the tensors the
    stages produce from `example_inputs`; no file is written unless every stage exports."""
    details = export_split_details(
        stages, example_inputs, out_dir, opset=opset, simplify=simplify, check=check, threads=threads
    )
    return {name: Path(d["path"]) for name, d in details.items()}


# ----------------------------------------------------------------------------------------------------------
# Running exported graphs in ONNX Runtime


class OrtPipeline:
    """One ONNX graph, or stage graphs chained by tensor name, in ONNX Runtime.

    `paths` is a path (one graph), or a mapping: {"model": path} for one graph, {stage: path} for a split,
    in run order (the mapping's order). The pipeline's inputs are the graph inputs no earlier graph
    produces; its outputs are the graph outputs no graph consumes. Calling it takes numpy inputs at the
    graph's static batch size; `run_any_batch` chunks and pads other batch sizes; `torch_runner()` adapts it
    to torch tensors in and out (for metric code written for PyTorch models).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Mapping[str, str | os.PathLike],
        threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ):
        if not isinstance(paths, Mapping):
            paths = {SINGLE: paths}
        if not paths:
            raise ValueError("no ONNX graph given")
        if SINGLE in paths and len(paths) > 1:
            raise ValueError("give either the single graph ('model') or the split stages, not both")
        for name, path in paths.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"ONNX file for {name} not found: {path}")
        self.sessions = {name: ort_session(path, threads, providers) for name, path in paths.items()}
        produced: set[str] = set()
        consumed: set[str] = set()
        self.input_names: list[str] = []
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        for session in self.sessions.values():
            for value in session.get_inputs():
                consumed.add(value.name)
                if value.name not in produced and value.name not in self.input_names:
                    self.input_names.append(value.name)
                    self.input_shapes[value.name] = tuple(value.shape)
            produced.update(o.name for o in session.get_outputs())
        late = [n for n in self.input_names if n in produced]
        if late:
            raise ValueError(f"graphs are not in run order: {late[0]!r} is read before the graph that writes it runs")
        self.output_names = [
            o.name for session in self.sessions.values() for o in session.get_outputs() if o.name not in consumed
        ]
        first = self.input_shapes[self.input_names[0]] if self.input_names else ()
        self.batch_size = int(first[0]) if first and isinstance(first[0], int) else 1

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

    def torch_runner(self) -> Runner:
        """The pipeline as a function of torch tensors (by input name) to torch tensors (by output name)."""

        def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            outputs = self.run_any_batch({name: inputs[name].cpu().numpy() for name in self.input_names})
            return {name: torch.from_numpy(value) for name, value in outputs.items()}

        return run


# ----------------------------------------------------------------------------------------------------------
# Parity


def _stack(runs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([np.asarray(r[name]) for r in runs]) for name in runs[0]}


def parity_report(
    model: nn.Module,
    onnx_paths: str | os.PathLike | Mapping[str, str | os.PathLike],
    samples: Sequence[ExampleInputs],
    threads: int = 1,
    *,
    input_names: Sequence[str] | None = None,
    atol: float = FP32_ATOL,
    metrics_fn: Callable[[Runner], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """ONNX Runtime (CPU, `threads` intra-op threads) against PyTorch (eval mode) on `samples`.

    `onnx_paths`: one path, or a mapping with "model" (the single graph) and/or split stages in run order.
    A sample is a dict keyed by graph input name (passed to the model as keywords), or a tuple/list or one
    tensor (positional, in graph input order). `input_names` default to the graphs' inputs. Per output
    max/mean abs error over all samples (`export.parity.compare_outputs`, fp32, `atol`) for the single graph
    and the chained split, and the chained split against the single graph; "meets_fp32_target" says
    whether every error is within 1e-4 regardless of `atol`. With `metrics_fn(runner) -> metrics`, the
    metrics through PyTorch and through each ORT pipeline, where a runner maps a dict of torch input
    tensors to a dict of output tensors.
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
    first = next(iter(pipelines.values()))
    names = list(input_names) if input_names is not None else first.input_names
    output_names = first.output_names
    keyword = isinstance(samples[0], Mapping)

    def run_torch(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if keyword:
            return named_outputs(model(**{name: inputs[name] for name in names}), output_names)
        return named_outputs(model(*[inputs[name] for name in names]), output_names)

    result: dict[str, Any] = {"threads": int(threads), "samples": len(samples), "precision": "fp32", "atol": atol}
    with eval_mode(model), torch_threads(threads), torch.no_grad():
        named = [named_inputs(sample, None if keyword else names)[0] for sample in samples]
        reference = [_to_numpy(run_torch(sample)) for sample in named]
        candidates = {}
        for label, pipeline in pipelines.items():
            candidates[label] = [
                pipeline.run_any_batch({k: s[k].cpu().numpy() for k in pipeline.input_names}) for s in named
            ]
            report = compare_outputs(_stack(reference), _stack(candidates[label]), atol_fp32=atol)
            result[label] = report.to_dict()
        if "single" in candidates and "split" in candidates:
            report = compare_outputs(_stack(candidates["single"]), _stack(candidates["split"]), atol_fp32=atol)
            result["split_vs_single"] = report.to_dict()
        if metrics_fn is not None:
            metrics = {"torch": dict(metrics_fn(run_torch))}
            for label, pipeline in pipelines.items():
                metrics[label] = dict(metrics_fn(pipeline.torch_runner()))
            result["metrics"] = metrics
    compared = [k for k in ("single", "split", "split_vs_single") if k in result]
    result["ok"] = all(result[k]["ok"] for k in compared)
    result["max_abs"] = {k: max(o["max_abs"] for o in result[k]["outputs"].values()) for k in compared}
    result["meets_fp32_target"] = all(v <= FP32_ATOL for v in result["max_abs"].values())
    return result
