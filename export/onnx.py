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

Nested inputs and outputs (docs/export_nesting.md has examples). The example call and the model's outputs may
nest tensors in dicts, lists, tuples and namedtuples (and any container registered with torch's pytree) to any
depth. `torch.utils._pytree.tree_flatten_with_path` flattens them (its API is the same in torch 2.4 to 2.13);
each tensor leaf is one graph input or output, and a wrapper module (`_FlatCall`) takes the flat tensors,
rebuilds the nested arguments, calls the model and flattens its outputs. A leaf's name is its path:

- the root: `input_<i>` for the i-th positional argument, the keyword for a keyword argument; for outputs,
  `output` for a single tensor, `output_<i>` for the i-th element of a returned tuple/list, the key of a
  returned dict;
- then each dict key, list/tuple index or namedtuple field below the root, joined with ".", every part with
  characters outside [A-Za-z0-9_] replaced by "_" (names stay ONNX- and TensorRT-safe: no spaces, ":" or ",",
  which trtexec's `--shapes`/`--loadInputs` lists would split);
- a name equal to an earlier leaf's gets the smallest suffix `_1`, `_2`, ... that no other leaf's name has
  (flattening order: positional then keyword arguments, dict insertion order, list order).

So `model({"points": p, "cams": [c0, c1]})` has inputs `input_0.points`, `input_0.cams.0`, `input_0.cams.1`;
`model(batch={...})` has `batch.points`, ...; a model returning `{"heatmap": h, "boxes": (b0, b1)}` has outputs
`heatmap`, `boxes.0`, `boxes.1`. A top-level tensor keeps its root name unchanged (`input_0`, `image`,
`output_1`, a dict key as given): plain tensor inputs and outputs are named, and traced, exactly as before
nesting was supported. `input_names` / `output_names` replace the names, one per tensor leaf, in that order.

Non-tensor leaves: None, bool, int, float, str (and torch dtypes/devices) in the inputs are constants, baked
into the graph by the tracer, never graph inputs (report: "constant_inputs", and a log line); in the outputs
they are left out of the graph ("constant_outputs"). Any other leaf type is refused with a ValueError naming
the leaf. A tensor inside a nested argument that the model never reads (a batch dict's targets, say) is left
out of the graph by the exporter and listed in "unused_inputs"; a plain tensor argument the model ignores is
still an error. Consumers feed graphs by name: `graph_feeds(example)` gives every tensor leaf by name.

`nn.MultiheadAttention` and `nn.TransformerEncoderLayer` in eval mode without grad take a fused fast path
(`torch._native_multi_head_attention`) the legacy exporter cannot express: it is switched off while tracing
(`mha_fastpath_off`), and the graph is checked against the fast path's own outputs.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
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
import torch.utils._pytree as pytree
from torch import nn

from common.io import atomic_write_bytes
from export import trt_check
from export.parity import compare_outputs

SINGLE = "model"  # key of the one-graph export in a mapping of ONNX paths
SLIM_FOLD_LIMIT_BYTES = 1 << 20  # onnxslim folds no constant larger than this (see the module docstring)
SLIM_RTOL = 1e-5  # simplified vs unsimplified outputs: max abs error <= SLIM_RTOL * max(1, |reference|max)
FP32_ATOL = 1e-4  # the fp32 parity target

log = logging.getLogger(__name__)

# What `export_onnx` takes as example inputs: positional arguments (a tuple/list), keyword arguments (a dict), or
# one tensor; each argument a tensor, a constant or a nest of them (see "Nested inputs and outputs" above).
ExampleInputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]
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
# Inputs and outputs of any nesting, flattened into named tensors (naming scheme: the module docstring)

CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)  # baked into the graph
_CONSTANTS = "None/bool/int/float/str constants"
_NESTING = "nested in dicts, lists, tuples or namedtuples"
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


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


def _segment(key: Any) -> str:
    """One step of a pytree key path as a name part: a dict key, a list/tuple index or a namedtuple field."""
    if isinstance(key, pytree.SequenceKey):
        text = str(key.idx)
    elif isinstance(key, pytree.MappingKey):
        text = str(key.key)
    elif isinstance(key, pytree.GetAttrKey):
        text = key.name
    else:  # a container type registered with torch's pytree by other code
        text = str(key).strip(".[]'\"")
    return _UNSAFE.sub("_", text) or "_"


def _leaf_name(root: str, path: Sequence[Any]) -> str:
    """`root` itself for a top-level tensor (the names plain inputs and outputs always had), else the root and
    the path joined by dots, each part reduced to [A-Za-z0-9_]."""
    if not path:
        return root
    return ".".join([_UNSAFE.sub("_", root) or "_", *(_segment(key) for key in path)])


def _unique(names: list[str]) -> list[str]:
    """The first of equal names keeps it; each later one gets the smallest `_<n>` suffix no other name has."""
    taken = set(names)
    seen: set[str] = set()
    result = []
    for name in names:
        if name in seen:
            n = 1
            while f"{name}_{n}" in taken:
                n += 1
            name = f"{name}_{n}"
            taken.add(name)
        seen.add(name)
        result.append(name)
    return result


def _describe(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


@dataclass
class FlatCall:
    """One call's arguments flattened: its tensor leaves by graph input name, its constants, and what rebuilds
    the call (positional and keyword arguments, with the original containers) from tensors in graph order."""

    args: tuple
    kwargs: dict[str, Any]
    names: list[str]  # graph input name of each tensor leaf, in flattening order
    tensors: list[torch.Tensor]
    constants: dict[str, str]  # name -> repr of each non-tensor leaf: baked into the graph, not an input
    spec: pytree.TreeSpec
    leaves: list[Any]
    slots: list[int]  # position of each tensor among `leaves`

    @property
    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))

    @property
    def keys(self) -> list[int | str]:
        """How the model takes each top-level argument: its position or its keyword."""
        return [*range(len(self.args)), *self.kwargs]

    @property
    def plain(self) -> bool:
        """Whether every argument is a tensor: the form exported as before nesting was supported."""
        return all(isinstance(v, torch.Tensor) for v in (*self.args, *self.kwargs.values()))

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
        """The call's (args, kwargs) with `tensors` (graph order) in place of the example tensors."""
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors, strict=True):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)


def _call_arguments(example_inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of an example: a tensor or a tuple/list is positional, a mapping is keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise ValueError("keyword example inputs need string keys (the forward's parameter names)")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(
        f"example inputs must be a tensor, a tuple/list (positional) or a dict (keywords), "
        f"not {type(example_inputs).__name__}"
    )


def _sort_leaves(names: list[str], leaves: list[Any], refusal: Callable[[str, Any], str]) -> tuple[list[int], dict]:
    """The positions of the tensor leaves, and the constant leaves' reprs by name; any other leaf type is a
    ValueError saying `refusal(name, leaf)`."""
    slots, constants = [], {}
    for index, (name, leaf) in enumerate(zip(names, leaves)):
        if isinstance(leaf, torch.Tensor):
            slots.append(index)
        elif isinstance(leaf, CONSTANT_TYPES):
            constants[name] = _describe(leaf)
        else:
            raise ValueError(refusal(name, leaf))
    return slots, constants


def _input_refusal(name: str, leaf: Any) -> str:
    return (
        f"example input {name!r} is a {type(leaf).__name__}, not a tensor; export takes tensors (graph inputs) "
        f"and {_CONSTANTS} (baked into the graph), {_NESTING}"
    )


def flatten_call(example_inputs: ExampleInputs, input_names: Sequence[str] | None = None) -> FlatCall:
    """Flatten `model(*example_inputs)` (tuple/list or one tensor) or `model(**example_inputs)` (dict), at any
    nesting, into named tensor leaves (the scheme in the module docstring; `input_names` replace the names in
    order). Non-tensor leaves of `CONSTANT_TYPES` become constants; any other leaf type is a ValueError."""
    args, kwargs = _call_arguments(example_inputs)
    paths, spec = pytree.tree_flatten_with_path((args, kwargs))
    leaves = [leaf for _, leaf in paths]
    roots = [f"input_{p[1].idx}" if isinstance(p[1], pytree.SequenceKey) else str(p[1].key) for p, _ in paths]
    names = _unique([_leaf_name(root, path[2:]) for root, (path, _) in zip(roots, paths)])
    slots, constants = _sort_leaves(names, leaves, _input_refusal)
    if not slots:
        raise ValueError("export needs at least one example input tensor")
    tensor_names = _names("input", input_names, [names[slot] for slot in slots])
    return FlatCall(args, kwargs, tensor_names, [leaves[slot] for slot in slots], constants, spec, leaves, slots)


def graph_feeds(example_inputs: ExampleInputs, input_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The example's tensors as numpy arrays by graph input name (what ONNX Runtime takes), at any nesting.

    Holds every tensor leaf; an exported graph may not use them all (ones the model ignores are left out of a
    nested call's graph), so pick the graph's inputs by name."""
    return {name: t.detach().cpu().numpy() for name, t in flatten_call(example_inputs, input_names).named.items()}


@dataclass
class FlatOutputs:
    """A model's outputs flattened: tensor leaves by graph output name, and non-tensor leaves left out."""

    tensors: dict[str, torch.Tensor]
    constants: dict[str, str]  # name -> repr of each None/constant leaf: not a graph output
    plain: bool  # a tensor, a tuple/list of tensors or a dict of tensors: the forms exported before nesting


def _output_tree(outputs: Any) -> tuple[Any, Callable[[Any], str]]:
    """The outputs as a pytree with a plain top level, and the root name of each top-level key."""
    if isinstance(outputs, torch.Tensor):
        return outputs, lambda key: "output"
    if isinstance(outputs, Mapping):
        return dict(outputs), lambda key: str(key.key)
    if isinstance(outputs, (tuple, list)):  # a namedtuple too: its fields are numbered like a tuple's
        return tuple(outputs), lambda key: f"output_{key.idx}"
    raise ValueError(
        f"the model returned a {type(outputs).__name__}; export needs tensors, {_NESTING} (not a constant alone)"
    )


def _output_refusal(name: str, leaf: Any) -> str:
    return (
        f"model output {name!r} is a {type(leaf).__name__}, not a tensor; export needs tensors "
        f"({_CONSTANTS} are left out of the graph), {_NESTING}"
    )


def flatten_outputs(outputs: Any, output_names: Sequence[str] | None = None) -> FlatOutputs:
    """Flatten a model's outputs at any nesting into named tensors (the scheme in the module docstring;
    `output_names` replace the names in order). None and other constants are left out; other types refused."""
    tree, root_of = _output_tree(outputs)
    paths = pytree.tree_flatten_with_path(tree)[0]
    leaves = [leaf for _, leaf in paths]
    names = _unique([_leaf_name(root_of(path[0]) if path else root_of(None), path[1:]) for path, _ in paths])
    slots, constants = _sort_leaves(names, leaves, _output_refusal)
    if not slots:
        raise ValueError(f"the model returned no tensors; export needs tensors, {_NESTING}")
    top = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, tuple) else (tree,)
    plain = all(isinstance(v, torch.Tensor) for v in top)
    tensor_names = _names("output", output_names, [names[slot] for slot in slots])
    return FlatOutputs(dict(zip(tensor_names, [leaves[slot] for slot in slots])), constants, plain)


def named_outputs(outputs: Any, output_names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A model's tensor outputs by graph name (`flatten_outputs`): a dict's keys, `output` for one tensor,
    `output_0, ...` for a tuple/list; nested ones by their paths."""
    return flatten_outputs(outputs, output_names).tensors


def output_tensors(outputs: Any) -> tuple[torch.Tensor, ...]:
    """A model's tensor outputs as a flat tuple, in graph output order."""
    return tuple(flatten_outputs(outputs).tensors.values())


class _FlatCall(nn.Module):
    """Takes the graph inputs positionally, in graph order, rebuilds the model's (nested) arguments, calls
    `model`, and with `flat_outputs` returns its tensor outputs as a flat tuple (in graph output order).

    Needed for nested inputs and outputs, and because the legacy exporter orders keyword inputs by the
    forward signature (not by the names given) and drops any that go to `**kwargs`. The graph's node and
    weight names gain a "model." prefix.
    """

    def __init__(self, model: nn.Module, call: FlatCall, flat_outputs: bool = False):
        super().__init__()
        self.model = model
        self.call = call
        self.flat_outputs = flat_outputs
        self.training = model.training  # not recursive: the model's submodules keep their own flags

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = self.call.rebuild(tensors)
        outputs = self.model(*args, **kwargs)
        return output_tensors(outputs) if self.flat_outputs else outputs


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
    call: FlatCall  # the model's example call, flattened

    @classmethod
    def build(cls, model: nn.Module, example_inputs: ExampleInputs, input_names: Sequence[str] | None) -> _Traceable:
        call = flatten_call(example_inputs, input_names)
        if not call.plain or not _legacy_keeps_order(model, call.keys):
            return cls(_FlatCall(model, call), tuple(call.tensors), {}, call)
        if call.args:
            return cls(model, tuple(call.tensors), {}, call)
        return cls(model, (), call.kwargs, call)  # the exporter's keyword path: unprefixed names

    def __call__(self) -> Any:
        return self.module(*self.args, **self.kwargs)

    @property
    def input_names(self) -> list[str]:
        return self.call.names

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return self.call.named

    def with_flat_outputs(self) -> _Traceable:
        """The same call, returning its tensor outputs as a flat tuple (for outputs the exporter cannot take)."""
        if isinstance(self.module, _FlatCall):
            module = _FlatCall(self.module.model, self.call, flat_outputs=True)
        else:
            module = _FlatCall(self.module, self.call, flat_outputs=True)
        return _Traceable(module, tuple(self.call.tensors), {}, self.call)


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


@contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """`nn.MultiheadAttention` / `nn.TransformerEncoderLayer` without their fused eval-mode fast path for the block.

    In eval mode without grad, self-attention with batch_first runs `torch._native_multi_head_attention`, which
    the legacy exporter cannot express; the regular path it takes instead computes the same function (the
    export's parity check compares the graph with the fast path's own outputs)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _graph_inputs(raw: onnx.ModelProto, traceable: _Traceable, path: Path) -> dict[str, torch.Tensor]:
    """The example tensors the graph takes, by name, checked against what was exported.

    With plain tensor arguments every one must be a graph input (an unused one is an error, as it always was).
    A nested call may carry tensors the model never reads (a batch dict's targets, say): the exporter leaves
    them out of the graph, and `_left_out` reports them."""
    given = traceable.inputs
    graph_inputs = [i.name for i in raw.graph.input]
    expected = list(given) if traceable.call.plain else [name for name in given if name in set(graph_inputs)]
    if graph_inputs != expected:
        raise ExportError(f"{path.name}: graph inputs {graph_inputs} differ from {expected} (an unused input?)")
    return {name: given[name] for name in graph_inputs}


LEFT_OUT = {  # report keys of what a nested export leaves out of the graph, and how to say it
    "constant_inputs": "constants baked into the graph (not graph inputs)",
    "unused_inputs": "input tensors the model does not read (not graph inputs)",
    "constant_outputs": "constant outputs (not graph outputs)",
}


def left_out_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per kind of leaf an export's report says the graph leaves out (none for plain tensors)."""
    lines = []
    for key, note in LEFT_OUT.items():
        value = report.get(key)
        if value:
            shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, Mapping) else ", ".join(value)
            lines.append(f"{note}: {shown}")
    return lines


def _left_out(
    path: Path, traceable: _Traceable, inputs: Mapping[str, torch.Tensor], outputs: FlatOutputs
) -> dict[str, Any]:
    """Report entries (and log lines) for what the graph leaves out: constant inputs baked into it, input
    tensors the model never reads, constant outputs. Empty for plain tensors in and out."""
    entries = {
        "constant_inputs": traceable.call.constants,
        "unused_inputs": [name for name in traceable.inputs if name not in inputs],
        "constant_outputs": outputs.constants,
    }
    entries = {key: value for key, value in entries.items() if value}
    for line in left_out_lines(entries):
        log.info("%s: %s", path.name, line)
    return entries


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
    with torch.no_grad():  # eager, so PyTorch's fused attention fast path is what the graph is judged against
        flat_outputs = flatten_outputs(traceable(), output_names)
    reference = _to_numpy(flat_outputs.tensors)
    output_names = list(reference)
    if not flat_outputs.plain:
        traceable = traceable.with_flat_outputs()

    fd, raw_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".raw.tmp", dir=path.parent)
    os.close(fd)
    module = traceable.module
    modes = {m: m.training for m in module.modules()}  # the exporter resets modes recursively: restore each
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), mha_fastpath_off():
            warnings.simplefilter("always")
            try:
                torch.onnx.export(
                    module,
                    traceable.args,
                    raw_tmp,
                    kwargs=traceable.kwargs or None,
                    input_names=traceable.input_names,
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
    inputs = _graph_inputs(raw, traceable, path)
    feeds = {name: value.detach().cpu().numpy() for name, value in inputs.items()}

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
        **_left_out(path, traceable, inputs, flat_outputs),
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

    Arguments and outputs may nest tensors in dicts, lists, tuples and namedtuples; each tensor leaf is one
    graph input or output, named by its path (the module docstring, "Nested inputs and outputs"): plain
    tensors keep the names they always had, the dict keys or `input_0, ...` and the output dict's keys,
    `output` (one tensor) or `output_0, ...`. Given `input_names` / `output_names` replace those, one per tensor
    leaf in order (ValueError if the count differs). None, bool, int, float and str leaves are constants baked
    into the graph (inputs) or left out of it (outputs), listed in the report; other leaf types are refused
    (ValueError). With `check=True` the export fails (`ExportError`, nothing written) when the
    TensorRT-readiness check finds an error. Returns the details: path, names, shapes, sizes before/after
    onnxslim, op histogram, readiness findings, "parity" / "max_abs_error" (ONNX Runtime against PyTorch on the
    example inputs, per output), and, when there are any, "constant_inputs", "unused_inputs" (tensors of a
    nested argument the model never reads: not graph inputs) and "constant_outputs".
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


def _torch_samples(
    model: nn.Module, samples: Sequence[ExampleInputs], input_names: Sequence[str] | None, graph_inputs: list[str]
) -> tuple[list[dict[str, torch.Tensor]], Callable[[Mapping[str, torch.Tensor]], Any]]:
    """Each sample's tensors by graph input name, and the model as a function of such a dict.

    Plain samples as always: keywords by their keys, positional tensors named by `input_names` (default: the
    graph's inputs) in order, and the model gets only the named inputs. A nested sample is flattened like an
    export's example, and the model gets the first sample's structure and constants back, with the tensors of
    the dict in place; every sample must share them."""
    if not flatten_call(samples[0]).plain:
        template = flatten_call(samples[0], input_names)
        named = []
        for index, sample in enumerate(samples):
            call = flatten_call(sample, input_names)
            if call.spec != template.spec or call.constants != template.constants:
                raise ValueError(f"sample {index} is nested differently from sample 0 or has other constants")
            named.append(call.named)

        def call_nested(inputs: Mapping[str, torch.Tensor]) -> Any:
            args, kwargs = template.rebuild([inputs[name] for name in template.names])
            return model(*args, **kwargs)

        return named, call_nested
    names = list(input_names) if input_names is not None else graph_inputs
    if isinstance(samples[0], Mapping):
        return [flatten_call(s).named for s in samples], lambda inputs: model(**{n: inputs[n] for n in names})
    return [flatten_call(s, names).named for s in samples], lambda inputs: model(*[inputs[n] for n in names])


def flat_runner(run: Runner) -> Runner:
    """`run` (which takes tensors by graph input name) taking a model's call instead: nested inputs (a dict of
    rulebooks, say) are flattened by the export's naming scheme; plain ones pass as they are."""

    def flat(inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        call = flatten_call(dict(inputs))
        return run(inputs if call.plain else call.named)

    return flat


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
    tensor (positional, in graph input order), or a nested call like `export_onnx`'s example inputs (same
    structure and constants in every sample; its tensor leaves named by the same scheme, or by `input_names`
    in order). `input_names` default to the graphs' inputs. Per output
    max/mean abs error over all samples (`export.parity.compare_outputs`, fp32, `atol`) for the single graph
    and the chained split, and the chained split against the single graph; "meets_fp32_target" says
    whether every error is within 1e-4 regardless of `atol`. With `metrics_fn(runner) -> metrics`, the
    metrics through PyTorch and through each ORT pipeline, where a runner maps a dict of torch input
    tensors (nested ones too, as the model takes them) to a dict of output tensors.
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
    named, call_model = _torch_samples(model, samples, input_names, first.input_names)

    def run_torch(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return named_outputs(call_model(inputs), first.output_names)

    result: dict[str, Any] = {"threads": int(threads), "samples": len(samples), "precision": "fp32", "atol": atol}
    with eval_mode(model), torch_threads(threads), torch.no_grad():
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
            metrics = {"torch": dict(metrics_fn(flat_runner(run_torch)))}
            for label, pipeline in pipelines.items():
                metrics[label] = dict(metrics_fn(flat_runner(pipeline.torch_runner())))
            result["metrics"] = metrics
    compared = [k for k in ("single", "split", "split_vs_single") if k in result]
    result["ok"] = all(result[k]["ok"] for k in compared)
    result["max_abs"] = {k: max(o["max_abs"] for o in result[k]["outputs"].values()) for k in compared}
    result["meets_fp32_target"] = all(v <= FP32_ATOL for v in result["max_abs"].values())
    return result
