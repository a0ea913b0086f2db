"""INT8 post-training quantization of any `nn.Module` with NVIDIA ModelOpt, placed as CUDA-BEVFusion does.

Why this module: a pruned model is deployed in INT8 next (NVIDIA's CUDA-BEVFusion: INT8 PTQ 67.66 mAP at
25 FPS vs FP16 67.89 at 18 FPS on Orin). ModelOpt (`nvidia-modelopt`, the successor of the
`pytorch_quantization` CUDA-BEVFusion used) inserts fake-quant modules; the TorchScript ONNX exporter turns
them into QuantizeLinear/DequantizeLinear pairs that TensorRT builds explicitly-quantized INT8 engines from
and ONNX Runtime runs on the CPU.

Placement rules (`QuantizeConfig`, each an option; CUDA-BEVFusion's choices are the defaults):

- `fuse_conv_bn`: every Conv followed by a BatchNorm (found by forward hooks: the BN's input is the conv's
  output tensor) is folded into one conv before quantizing, so the weight quantizer sees the weights the
  engine will run. ModelOpt itself does not fold BN (its weights pass through Q/DQ unfolded). The fused
  model's outputs are checked against the unfused one; a conv whose output also feeds something else
  would change them and fails the check (`QuantizeError`).
- `share_quantizers`: input quantizers that quantize the same tensor (the decoder output read by two head
  convs, an FPN level read by two convs) get one scale, the largest, so the graph has one Q per tensor.
  The inputs of a Concat or a residual Add already share one quantizer by placement: ModelOpt quantizes
  the input of the consuming conv, after the Concat/Add, and TensorRT propagates that scale backwards.
- `quantize_residual_adds` (default on): CUDA-BEVFusion's rule "inputs of an Add share one quantizer" applied to
  residual Adds. Without it the Add reads the unquantized identity and the unquantized conv output, so
  ONNX Runtime CPU cannot run the conv before the Add (a residual block's second conv, a downsample conv)
  as an integer kernel. With it each module whose own forward adds two float tensors of one shape (found
  generically: one forward run under a `TorchFunctionMode` that records the adds per innermost module,
  `find_residual_adds`) is rewritten with torch.fx so the Add becomes `ResidualAdd`: one quantizer called on
  both inputs (calibrated over both, so one scale), exported as a Q/DQ pair on each Add input with the same
  scale. A module torch.fx cannot trace (a list input, data-dependent control flow) is left as it is and
  reported. TensorRT's own placement guide recommends Q/DQ on the identity (residual) input only, so the
  conv output can fuse with the Add; Q/DQ on both inputs is what CUDA-BEVFusion exported and what ONNX
  Runtime's QLinearConv/QLinearAdd fusions need.
- `skip`: module names (or prefixes) left in floating point. The reference model's defaults (its first
  LiDAR layer and first decoder deblock, CUDA-BEVFusion issue #8) come from the caller: `export` knows
  no model.
- Only Conv/ConvTranspose/Linear get quantizers; everything else (BEV pooling, scatter or cumsum, the
  heads' decoding) stays floating point. `quantizer_table` lists what was quantized, for verification.

Calibration: `method="max"` (ModelOpt's max calibrator, its INT8 default), `"mse"` (ModelOpt's MSE search
of the amax), or `"histogram"` (histogram calibrator on activations with entropy amax, as
pytorch_quantization's PTQ). Calibration batches must come from the training split (the caller's job:
never calibrate on the data you evaluate on).

Storage (`save_quantized` / `load_quantized`): ModelOpt's own `modelopt_state` holds objects JSON cannot
store (measured: `torch.dtype` values) and ModelOpt saves it with `torch.save` (pickle), so it is not used. Instead the quantized model's full
state dict (fused weights and every quantizer's `_amax`) goes to `model.safetensors`, and `quantized.json`
holds the `QuantizeConfig` and the fused Conv+BN pairs. Loading rebuilds deterministically: take a
freshly built floating-point model of the same architecture (pruned widths included), fuse the same pairs,
insert quantizers with the same config (no calibration), then load the tensors strictly.
"""

from __future__ import annotations

import json
import operator
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.finite import check_finite
from common.io import staged_directory
from common.progress import progress_bar
from common.task import Task

QUANT_FORMAT = "altermoma-quantized"
QUANT_VERSION = 1
QUANT_META = "quantized.json"
QUANT_WEIGHTS = "model.safetensors"
QUANT_KIND = "quantized"
METHODS = ("max", "mse", "histogram")
FUSE_RTOL = 1e-3  # fused vs unfused outputs: max abs error <= FUSE_RTOL * max(1, |reference|max)


class QuantizeError(ValueError):
    """Quantization that cannot be done as asked: ModelOpt missing, no calibration data, a bad option."""


def modelopt_missing() -> str | None:
    """Why ModelOpt cannot be used here (None: it can). It needs `requests` and `huggingface_hub`
    although it does not declare them; the `quant` extra pins all three."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as error:
        return f"nvidia-modelopt is not usable ({error}); install the extra: pip install 'altermoma[quant]'"
    return None


def _mtq():
    reason = modelopt_missing()
    if reason:
        raise QuantizeError(reason)
    import modelopt.torch.quantization as mtq

    return mtq


@dataclass
class QuantizeConfig:
    """How to quantize (see the module docstring for why each default)."""

    fuse_conv_bn: bool = True
    share_quantizers: bool = True
    skip: tuple[str, ...] = ()
    method: str = "max"
    per_channel_weights: bool = True
    num_bits: int = 8
    quantize_residual_adds: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(self.skip)

    def validate(self) -> QuantizeConfig:
        if self.method not in METHODS:
            raise QuantizeError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_bits != 8:
            raise QuantizeError(f"only INT8 is supported (TensorRT's explicit Q/DQ INT8), got num_bits={self.num_bits}")
        if not all(isinstance(s, str) and s for s in self.skip):
            raise QuantizeError(f"skip must be module names, got {self.skip!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizeConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantizeError(f"unknown quantize option(s): {', '.join(unknown)}")
        # Checkpoints written before the residual-Add option existed had none (their `residual_adds` list is empty).
        return cls(**{"quantize_residual_adds": False, **data, "skip": tuple(data.get("skip", ()))}).validate()

    def modelopt_config(self) -> dict[str, Any]:
        """The ModelOpt config: INT8, symmetric; weights per output channel; activations per tensor."""
        weight_axis = 0 if self.per_channel_weights else None
        activation: dict[str, Any] = {"num_bits": self.num_bits, "axis": None}
        if self.method == "histogram":
            activation["calibrator"] = "histogram"
        quant_cfg: list[dict[str, Any]] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": self.num_bits, "axis": weight_axis}},
            {"quantizer_name": "*input_quantizer", "cfg": activation},
        ]
        if self.per_channel_weights:  # a transposed conv's weight is (in, out, ...): its output channels are axis 1
            for parent in ("nn.ConvTranspose1d", "nn.ConvTranspose2d", "nn.ConvTranspose3d"):
                quant_cfg.append(
                    {
                        "quantizer_name": "*weight_quantizer",
                        "parent_class": parent,
                        "cfg": {"num_bits": self.num_bits, "axis": 1},
                    }
                )
        for parent in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d", "nn.LeakyReLU", "nn.Embedding"):
            quant_cfg.append({"quantizer_name": "*", "parent_class": parent, "enable": False})
        for name in self.skip:  # a module's quantizers are its children: "<name>.input_quantizer", ...
            quant_cfg.append({"quantizer_name": f"{name}.*", "enable": False})
        algorithm: Any = {"method": "mse"} if self.method == "mse" else "max"
        return {"quant_cfg": quant_cfg, "algorithm": algorithm}


# ----------------------------------------------------------------------------------------------------------
# Conv + BN fusion


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_conv_bn_pairs(model: nn.Module, run: Callable[[nn.Module], Any]) -> list[tuple[str, str]]:
    """(conv name, BN name) for every BatchNorm whose input is exactly a conv's output in one forward `run`.

    Hooks, not a graph: it works for any model that runs, whatever its forward does in between."""
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (conv, tensor kept alive so ids stay unique)
    pairs: dict[str, str] = {}
    handles = []

    def conv_hook(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (name, output)

        return hook

    def bn_hook(name: str):
        def hook(_module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in produced:
                conv = produced[id(inputs[0])][0]
                if pairs.setdefault(name, conv) != conv:
                    pairs[name] = ""  # fed by different convs on different calls: not fusable

        return hook

    for name, module in modules.items():
        if isinstance(module, _CONVS):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, _BNS):
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    convs = [conv for conv in pairs.values() if conv]
    # A conv feeding two BNs cannot be fused into both.
    return sorted((conv, bn) for bn, conv in pairs.items() if conv and convs.count(conv) == 1)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_conv_bn_fusion(model: nn.Module, pairs: Iterable[Sequence[str]]) -> None:
    """Fold each (conv, BN) pair into the conv (`torch.nn.utils.fusion.fuse_conv_bn_eval`, BN running
    statistics), the BN becoming `nn.Identity`. Deterministic given the names, so a saved model reloads."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, _CONVS) or not isinstance(bn, _BNS):
            raise QuantizeError(f"cannot fuse {conv_name} ({type(conv).__name__}) with {bn_name} ({type(bn).__name__})")
        transpose = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=transpose)
        _set_module(model, conv_name, fused)
        _set_module(model, bn_name, nn.Identity())


# ----------------------------------------------------------------------------------------------------------
# Residual Adds: one shared quantizer on both inputs

_ADD_FUNCTIONS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
                  torch.Tensor.add_)  # fmt: skip
_FX_ADDS = (operator.add, operator.iadd, torch.add)


def find_residual_adds(model: nn.Module, run: Callable[[nn.Module], Any]) -> dict[str, int]:
    """{module name: adds} for every module whose OWN forward (not a child's) adds two computed float tensors
    of the same shape (a residual Add) in one forward `run`.

    Generic: module hooks keep the stack of running modules and a `TorchFunctionMode` sees every `a + b`,
    `torch.add`, `a += b`; broadcasting adds (a bias, a parameter) and the root module are not counted."""
    from torch.overrides import TorchFunctionMode

    stack: list[str] = []
    found: dict[str, int] = {}

    class _Adds(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func in _ADD_FUNCTIONS
                and stack
                and stack[-1]
                and len(args) == 2
                and "alpha" not in kwargs
                and all(isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) for a in args)
                and all(a.is_floating_point() for a in args)
                and args[0].shape == args[1].shape
            ):
                found[stack[-1]] = found.get(stack[-1], 0) + 1
            return func(*args, **kwargs)

    def enter(name: str):
        def hook(_module, _inputs) -> None:
            stack.append(name)

        return hook

    def leave(_module, _inputs, _output) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), _Adds():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return found


class ResidualAdd(nn.Module):
    """`a + b` as a module, so ModelOpt can give it a quantizer: converted by ModelOpt (registered in
    `_register_residual_add`) it quantizes both inputs with ONE quantizer (`input_quantizer`, calibrated over
    both: one scale, as CUDA-BEVFusion's QuantAdd), configured by the config's `*input_quantizer` entry."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def _register_residual_add() -> None:
    """Teach ModelOpt's module registry to convert `ResidualAdd` (once per process)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QuantModule
    from modelopt.torch.quantization.tensor_quant import QUANT_DESC_8BIT_PER_TENSOR

    if ResidualAdd in QuantModuleRegistry:
        return

    class QuantResidualAdd(QuantModule):
        def _setup(self) -> None:
            self._register_temp_attribute("input_quantizer", TensorQuantizer(QUANT_DESC_8BIT_PER_TENSOR))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return super().forward(self.input_quantizer(a), self.input_quantizer(b))

    QuantModuleRegistry.register({ResidualAdd: "ResidualAdd"})(QuantResidualAdd)


def _fx_adds(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [
        node
        for node in graph.nodes
        if len(node.args) == 2
        and not node.kwargs
        and all(isinstance(a, torch.fx.Node) for a in node.args)
        and (
            (node.op == "call_function" and node.target in _FX_ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_", "__add__"))
        )
    ]


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with `ResidualAdd` (and ModelOpt's modules) kept as calls, not inlined."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            isinstance(m, ResidualAdd)
            or type(m).__module__.startswith("modelopt")
            or super().is_leaf_module(m, qualname)
        )


def _trace(module: nn.Module) -> torch.fx.GraphModule:
    graph = _Tracer().trace(module)
    return torch.fx.GraphModule(module, graph, type(module).__name__)


def residual_add_graph(module: nn.Module, adds: int) -> torch.fx.GraphModule:
    """`module` traced by torch.fx with each of its `adds` tensor-tensor Adds replaced by a `ResidualAdd`
    (`residual_add`, `residual_add_1`, ...). Raises QuantizeError where tracing fails or finds another count."""
    try:
        traced = _trace(module)
    except Exception as error:  # fx raises many types for untraceable code
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        raise QuantizeError(f"torch.fx cannot trace it ({reason})") from None
    nodes = _fx_adds(traced.graph)
    if len(nodes) != adds:
        raise QuantizeError(f"torch.fx found {len(nodes)} tensor Adds, the forward run {adds}")
    for index, node in enumerate(nodes):
        name = "residual_add" if index == 0 else f"residual_add_{index}"
        traced.add_module(name, ResidualAdd())
        with traced.graph.inserting_after(node):
            new = traced.graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(new)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.recompile()
    return traced


def apply_residual_add_quantizers(model: nn.Module, found: Mapping[str, int]) -> tuple[list[str], dict[str, str]]:
    """Rewrite every module in `found` ({name: adds}) with `residual_add_graph`, in place. Returns the names
    rewritten and {name: why not} for those left as they are. Deterministic given `found`, so a saved
    model reloads; run before ModelOpt's insertion so the new quantizers are configured and calibrated."""
    done, skipped = [], {}
    for name in sorted(found, key=lambda n: -n.count(".")):  # innermost first: a parent traces its new children
        try:
            _set_module(model, name, residual_add_graph(model.get_submodule(name), found[name]))
            done.append(name)
        except QuantizeError as error:
            skipped[name] = str(error)
    return sorted(done), skipped


# ----------------------------------------------------------------------------------------------------------
# Quantizers


def _flat_tensors(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        return [t for v in outputs.values() for t in _flat_tensors(v)]
    if isinstance(outputs, (tuple, list)):
        return [t for v in outputs for t in _flat_tensors(v)]
    return []


def max_scaled_error(reference: Any, candidate: Any) -> float:
    """Largest |candidate - reference| over all output tensors, over max(1, |reference|max) of that tensor."""
    worst = 0.0
    for ref, cand in zip(_flat_tensors(reference), _flat_tensors(candidate), strict=True):
        if not ref.is_floating_point():
            continue
        err = (cand.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
        worst = max(worst, err / max(1.0, ref.abs().max().item() if ref.numel() else 0.0))
    return worst


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """ModelOpt's TensorQuantizer modules by name (enabled or not)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def quantizer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer: name, enabled, axis, amax range. What a user checks placement with."""
    rows = []
    for name, q in quantizers(model).items():
        amax = getattr(q, "amax", None)
        row: dict[str, Any] = {"name": name, "enabled": bool(q.is_enabled), "axis": q.axis}
        if isinstance(amax, torch.Tensor) and amax.numel():
            row["amax_min"], row["amax_max"] = float(amax.min()), float(amax.max())
        rows.append(row)
    return rows


def share_input_quantizers(model: nn.Module, run: Callable[[nn.Module], Any]) -> list[list[str]]:
    """Give enabled per-tensor input quantizers that read the same tensor one amax (the largest).
    Returns the groups (two or more quantizer names each)."""
    seen: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []
    handles = []
    for name, q in quantizers(model).items():
        if name.endswith("input_quantizer") and q.is_enabled and q.axis is None:

            def hook(_module, inputs, _name=name):
                if inputs and isinstance(inputs[0], torch.Tensor):
                    keep.append(inputs[0])
                    group = seen.setdefault(id(inputs[0]), [])
                    if _name not in group:
                        group.append(_name)

            handles.append(q.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    table = quantizers(model)
    groups: list[list[str]] = []
    for group in (g for g in seen.values() if len(g) > 1):  # one quantizer reading two tensors joins their groups
        overlapping = [g for g in groups if set(g) & set(group)]
        merged = [n for g in overlapping for n in g] + [n for n in group if not any(n in g for g in overlapping)]
        groups = [g for g in groups if g not in overlapping] + [merged]
    for group in groups:
        amax = torch.stack([table[n].amax.detach().reshape(()) for n in group]).max()
        for name in group:
            table[name].amax = amax.clone()
    return sorted(groups)


def _check_skip(model: nn.Module, skip: Sequence[str]) -> None:
    names = {name for name, _ in model.named_modules()}
    for entry in skip:
        if not any(n == entry or n.startswith(entry + ".") for n in names):
            raise QuantizeError(f"skip: no module named {entry!r} in the model")


def insert_quantizers(model: nn.Module, config: QuantizeConfig, forward_loop: Callable[[nn.Module], Any] | None):
    """ModelOpt's quantizer insertion (and calibration when `forward_loop` is given), in place."""
    mtq = _mtq()
    _register_residual_add()
    modelopt_config = config.modelopt_config()
    if forward_loop is None:  # rebuilding a saved model: its amax values are loaded afterwards
        modelopt_config["algorithm"] = None
    return mtq.quantize(model, modelopt_config, forward_loop)


@torch.no_grad()
def histogram_calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> None:
    """Histogram calibration with entropy (KL) amax for activations, max for weights.

    ModelOpt 0.47's `finish_stats_collection(method="entropy")` passes the method to every calibrator,
    and its max calibrator takes none (TypeError), so this is its loop with the method given per calibrator.
    """
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection

    enable_stats_collection(model)
    forward_loop(model)
    for quantizer in quantizers(model).values():
        if quantizer._disabled:
            continue
        calibrator = getattr(quantizer, "_calibrator", None)
        if calibrator is not None:
            method = ("entropy",) if isinstance(calibrator, HistogramCalibrator) else ()
            if calibrator.compute_amax(*method) is not None:
                quantizer.load_calib_amax(*method)
        quantizer.enable_quant()
        quantizer.disable_calib()


@torch.no_grad()
def quantize(
    model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    config: QuantizeConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """INT8 PTQ of `model` in place, calibrated on `batches` (from the TRAINING split) run through `task`.

    Returns a report: fused Conv+BN pairs and the fusion's output error, the quantizer table, the groups
    given a shared scale, the skipped modules, the calibration batches and time, and the fake-quant
    model's scaled error against the floating-point model on the first batch.
    """
    config = (config or QuantizeConfig()).validate()
    _mtq()
    batches = list(batches)
    if not batches:
        raise QuantizeError("no calibration batches: give at least one batch from the training split")
    _check_skip(model, config.skip)
    start = time.perf_counter()
    model.eval()

    def run_first(m: nn.Module) -> Any:
        return task.forward(m, batches[0])

    reference = run_first(model)
    pairs: list[tuple[str, str]] = []
    fuse_error = 0.0
    if config.fuse_conv_bn:
        pairs = find_conv_bn_pairs(model, run_first)
        apply_conv_bn_fusion(model, pairs)
        fuse_error = max_scaled_error(reference, run_first(model))
        if fuse_error > FUSE_RTOL:
            raise QuantizeError(
                f"Conv+BN fusion changed the outputs (scaled max abs error {fuse_error:.2e}): a conv's output also "
                "feeds something besides its BatchNorm; quantize with fuse_conv_bn=False"
            )

    residual_adds: list[str] = []
    residual_skipped: dict[str, str] = {}
    if config.quantize_residual_adds:
        residual_adds, residual_skipped = apply_residual_add_quantizers(model, find_residual_adds(model, run_first))

    def forward_loop(m: nn.Module) -> None:
        for batch in progress_bar(batches, desc="calibrate", enabled=progress, leave=False):
            task.forward(m, batch)

    if config.method == "histogram":
        insert_quantizers(model, config, None)
        histogram_calibrate(model, forward_loop)
    else:
        insert_quantizers(model, config, forward_loop)
    groups = share_input_quantizers(model, run_first) if config.share_quantizers else []
    table = quantizer_table(model)
    quant_error = max_scaled_error(reference, run_first(model))
    return {
        "config": config.to_dict(),
        "calibration_batches": len(batches),
        "fused_conv_bn": [list(p) for p in pairs],
        "fusion_max_scaled_error": fuse_error,
        "residual_adds": residual_adds,
        "residual_adds_not_quantized": residual_skipped,
        "quantizers": len(table),
        "quantizers_enabled": sum(r["enabled"] for r in table),
        "quantizer_table": table,
        "shared_groups": groups,
        "skipped": list(config.skip),
        "fake_quant_max_scaled_error": quant_error,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------------------------------------
# Exact parity with the exported Q/DQ graph

# ONNX Runtime graph optimizers that change what a Q/DQ graph computes (not only how fast). Measured with
# ORT 1.32 on tiny-fusion: `WeightBiasQuantization` rewrites each Conv's float bias into an int32 tensor with
# scale x_scale * w_scale (a rounding the graph does not contain; it lets ORT fuse QLinearConv). With it off,
# ORT_ENABLE_ALL gives bit-identical outputs to ORT_DISABLE_ALL on the TensorRT-form graph.
ORT_INEXACT_OPTIMIZERS = ("WeightBiasQuantization",)


def _onnx_fake_quant(inputs, amax, num_bits=8, unsigned=False, narrow_range=True):
    """ModelOpt's CPU fake quant rewritten as ONNX QuantizeLinear + DequantizeLinear compute it (the export's
    `scale = float32(amax) / 127`, zero scale -> 1): q = saturate(round_half_even(x / scale)), x' = q * scale."""
    if num_bits != 8 or unsigned:
        raise QuantizeError("ONNX Q/DQ semantics are implemented for signed INT8 only")
    dtype = inputs.dtype
    scale = amax.float() / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    low = -127.0 if narrow_range else -128.0
    return (torch.clamp(torch.round(inputs.float() / scale), low, 127.0) * scale).to(dtype)


@contextmanager
def onnx_qdq_semantics() -> Iterator[None]:
    """Within this block ModelOpt's fake quant computes exactly what the exported Q/DQ graph computes.

    Why: ModelOpt (0.47, CPU path `tensor_quant._tensor_quant`) quantizes as `round(x * (127 / amax))` and
    dequantizes as `q / (127 / amax)`, while ONNX QuantizeLinear divides by the stored scale
    `amax / 127` and DequantizeLinear multiplies by it. The two differ in the last bit of float32; an
    activation on a rounding boundary then rounds the other way and the difference grows layer by layer
    (measured on tiny-fusion: heatmap 0.059 apart on one scene from this alone). Same amax, same rounding
    (half to even), same saturation ([-128, 127]: ModelOpt's INT8 default is not narrow range)."""
    _mtq()
    from modelopt.torch.quantization import tensor_quant

    original = tensor_quant._tensor_quant
    tensor_quant._tensor_quant = _onnx_fake_quant
    try:
        yield
    finally:
        tensor_quant._tensor_quant = original


def ort_qdq_session(path: str | os.PathLike, threads: int = 1, exact: bool = True):
    """An ONNX Runtime CPU session for a Q/DQ graph; `exact` turns off the optimizers that change its
    function (`ORT_INEXACT_OPTIMIZERS`), so the session computes the graph as specified."""
    import onnxruntime as ort

    from export.onnx import session_options

    disabled = list(ORT_INEXACT_OPTIMIZERS) if exact else []
    return ort.InferenceSession(
        os.fspath(path), session_options(threads), providers=["CPUExecutionProvider"], disabled_optimizers=disabled
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds ModelOpt quantizers (False where ModelOpt is not installed)."""
    if modelopt_missing():
        return False
    return bool(quantizers(model))


# ----------------------------------------------------------------------------------------------------------
# The quantized checkpoint: safetensors + JSON, never pickle


def is_quantized_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / QUANT_META).is_file()


def read_quantized_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / QUANT_META
    if not path.is_file():
        raise QuantizeError(f"{directory} is not a quantized checkpoint: {QUANT_META} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantizeError(f"corrupt quantized-checkpoint metadata {path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != QUANT_FORMAT:
        raise QuantizeError(f"{path} is not an altermoma quantized checkpoint")
    return meta


def write_quantized(
    model: nn.Module, directory: str | os.PathLike, report: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> None:
    """Write `model.safetensors` (the quantized model's state dict, amax included) and `quantized.json` (the
    config, the fused pairs, `metadata`) into an existing folder (a caller's staging folder)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": QUANT_FORMAT,
        "version": QUANT_VERSION,
        "config": report["config"],
        "fused_conv_bn": report["fused_conv_bn"],
        "residual_adds": report.get("residual_adds", []),
        "calibration_batches": report["calibration_batches"],
        "shared_groups": report.get("shared_groups", []),
        **dict(metadata or {}),
    }
    save_file(state, str(directory / QUANT_WEIGHTS))
    (directory / QUANT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def save_quantized(
    model: nn.Module, directory: str | os.PathLike, report: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> Path:
    """`write_quantized` into a staged folder swapped in whole (a crash never leaves half a checkpoint)."""
    with staged_directory(directory, kind=QUANT_KIND) as staging:
        write_quantized(model, staging, report, metadata)
    return Path(directory)


def load_quantized(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Rebuild a saved quantized model from `model`, a floating-point model of the same architecture and
    widths (its weights are replaced): fuse the same pairs, insert quantizers (no calibration), load strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_quantized_metadata(directory)
    config = QuantizeConfig.from_dict(meta["config"])
    try:
        state = load_file(str(Path(directory) / QUANT_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as error:
        raise QuantizeError(f"corrupt quantized weights in {directory}: {error}") from None
    check_finite(state, f"quantized checkpoint {directory}")  # NaN/Inf weights or scales: refused (issue 26)
    model.eval()
    apply_conv_bn_fusion(model, meta["fused_conv_bn"])
    if meta.get("residual_adds"):
        found = {name: 0 for name in meta["residual_adds"]}
        for name in found:  # the same rewrite as at quantization: count the module's Adds again
            found[name] = len(_fx_adds(_trace(model.get_submodule(name)).graph))
        done, skipped = apply_residual_add_quantizers(model, found)
        if skipped:
            name, why = next(iter(skipped.items()))
            raise QuantizeError(f"{directory}: residual Add of {name} cannot be rebuilt: {why}")
    insert_quantizers(model, config, None)
    # Quantizers get their `_amax` buffer at calibration; create them so the strict load has a place to put them.
    table = quantizers(model)
    for key, value in state.items():
        owner, _, attr = key.rpartition(".")
        if owner in table and attr == "_amax" and not hasattr(table[owner], "_amax"):
            table[owner].register_buffer("_amax", torch.zeros_like(value))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise QuantizeError(f"{directory} does not fit this model ({what})")
    bad = [k for k, v in state.items() if own[k].shape != v.shape]
    if bad:
        raise QuantizeError(
            f"{directory}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, model expects "
            f"{tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict(state)
    return model.eval()


__all__ = [
    "QuantizeConfig",
    "QuantizeError",
    "quantize",
    "save_quantized",
    "load_quantized",
    "quantizer_table",
    "find_residual_adds",
    "apply_residual_add_quantizers",
    "ResidualAdd",
    "is_quantized",
    "is_quantized_checkpoint",
    "modelopt_missing",
    "onnx_qdq_semantics",
    "ort_qdq_session",
    "ORT_INEXACT_OPTIMIZERS",
]
