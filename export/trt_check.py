"""Static "TensorRT-readiness" check of an ONNX graph, run before anything is copied to a Jetson.

Building a TensorRT engine on a Jetson Orin takes minutes, and the parser's error for an unsupported
node (or, worse, a silently wrong result) only shows up at the end of that loop. This module walks an
ONNX graph, subgraphs included, and flags what TensorRT 10.x's ONNX parser rejects or handles badly,
so that the exporter can be fixed on the workstation.

Each rule is a small function registered in `RULES`; its docstring cites the documentation it rests on.
The sources are the onnx-tensorrt operator matrix (`docs/operators.md`, TensorRT 10.0 and 10.15
editions), the TensorRT 10.0 / 10.3 release notes and the scatterElements plugin README in
NVIDIA/TensorRT. JetPack 6.1 ships TensorRT 10.3, which sits between those two operator matrices, so
the version-dependent rules (opset) warn instead of failing when the 10.x releases disagree.

A rule deliberately left out: INT64 tensors. TensorRT <= 8.x cast INT64 down to INT32 (and said so in
operators.md); the TensorRT 10 matrix lists INT64 as a supported type for most operators, so flagging
INT64 initializers would be noise.

Usage: `check_model("model.onnx", fp16=True)` or `python -m export.trt_check model.onnx --fp16`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

ERROR = "error"
WARNING = "warning"

# onnx-tensorrt docs/operators.md: "TensorRT 10.0 supports operators in the inclusive range of opset 9 to
# opset 20"; the TensorRT 10.15 edition says "opset 9 to opset 24".
MIN_OPSET = 9
MAX_OPSET_TRT_10_0 = 20
MAX_OPSET_TRT_10_LATEST = 24

# operators.md (TensorRT 10.x), TopK row: "`K` input must be less than 3840". ITopKLayer::setK says
# "only values up to 3840"; we follow the parser document, the stricter of the two.
TOPK_K_LIMIT = 3840

# Operators marked "N" (not supported) in the TensorRT 10.x operators.md. NonZero is handled apart: the
# parser supports it since TensorRT 8.5, but its output shape depends on the data.
UNSUPPORTED_OPS = frozenset(
    {
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "CenterCropPad",
        "Col2Im",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "ImageDecoder",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "RegexFullMatch",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    }
)

# Ops worth pinning to FP32 when the engine is built with --fp16, and why (FP16: max 65504, 10-bit mantissa).
FP16_RISKY_OPS = {
    "CumSum": "a running sum loses precision as it grows (our BEV-pooling cumsum trick: ~5% of the mean output)",
    "ReduceSum": "a long sum can overflow 65504 or lose small terms",
    "ReduceSumSquare": "squares overflow 65504 quickly (|x| > 256)",
    "Exp": "overflows to inf for inputs above ~11",
    "Log": "inputs below FP16's smallest normal (6e-5) flush towards -inf",
    "Pow": "large bases or exponents overflow 65504",
}

DEFAULT_DOMAINS = ("", "ai.onnx")
_ZERO_PASSTHROUGH_OPS = ("Identity", "Cast", "Expand")  # ops that keep an all-zeros tensor all zeros


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT would reject ("error") or run slowly, inaccurately or only with a plugin ("warning")."""

    rule: str
    severity: str
    node: str
    op_type: str
    message: str


@dataclass
class _Context:
    """Everything the rules need, computed once: all nodes (subgraphs included), constants, types, producers."""

    model: onnx.ModelProto
    fp16: bool
    graphs: list[onnx.GraphProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    constants: dict[str, TensorProto] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)
    local_functions: set[tuple[str, str]] = field(default_factory=set)

    @property
    def opset(self) -> int | None:
        """Opset of the default ONNX domain, or None when the model does not import it."""
        for imp in self.model.opset_import:
            if imp.domain in DEFAULT_DOMAINS:
                return imp.version
        return None

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of a tensor known at build time (initializer or Constant output), else None."""
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - e.g. external data that was not loaded: treat as unknown
            return None


def check_model(model: onnx.ModelProto | str | os.PathLike, fp16: bool = False) -> list[Finding]:
    """Run every rule in `RULES` over `model` (a ModelProto or a path) and return the findings, errors first."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    ctx = _build_context(_infer_shapes(model), fp16)
    findings = [finding for rule in RULES for finding in rule(ctx)]
    return sorted(findings, key=lambda f: f.severity != ERROR)  # stable: rule order kept within a severity


def format_findings(findings: list[Finding]) -> str:
    """A readable multi-line report: a summary line, then one line per finding, errors first."""
    if not findings:
        return "no findings"
    n_err = sum(f.severity == ERROR for f in findings)
    n_warn = len(findings) - n_err
    lines = [f"TensorRT readiness: {n_err} error(s), {n_warn} warning(s)"]
    for f in sorted(findings, key=lambda f: f.severity != ERROR):
        lines.append(f"  {f.severity.upper():7} [{f.rule}] {f.node} ({f.op_type}): {f.message}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Graph indexing


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape/type inference: rules still run on the raw graph when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - >2 GB protos, unknown ops, invalid graphs: fall back to what we have
        return model


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, recursively, every If/Loop/Scan body nested in it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _iter_graphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_graphs(sub)


def _build_context(model: onnx.ModelProto, fp16: bool) -> _Context:
    """Index the model once so that every rule is a simple loop."""
    ctx = _Context(model=model, fp16=fp16)
    ctx.graphs = list(_iter_graphs(model.graph))
    ctx.local_functions = {(f.domain, f.name) for f in model.functions}
    for graph in ctx.graphs:
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type"):
                ctx.elem_types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            ctx.constants[init.name] = init
            ctx.elem_types[init.name] = init.data_type
        for node in graph.node:
            ctx.nodes.append(node)
            for out in node.output:
                ctx.producers[out] = node
            for inp in node.input:
                ctx.consumers.setdefault(inp, []).append(node)
            constant = _constant_node_tensor(node)
            if constant is not None and node.output:
                ctx.constants[node.output[0]] = constant
                ctx.elem_types.setdefault(node.output[0], constant.data_type)
    return ctx


def _constant_node_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a Constant node produces, for the attribute forms that hold numbers."""
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = np.array(helper.get_attribute_value(attr))
            dtype = np.float32 if attr.name.startswith("value_float") else np.int64
            return numpy_helper.from_array(value.astype(dtype))
    return None


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Attribute value by name (strings decoded), or `default` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _label(node: onnx.NodeProto) -> str:
    """Node name for reports; exporters often leave it empty, so fall back to its first output."""
    return node.name or (node.output[0] if node.output else f"<unnamed {node.op_type}>")


def _ops(ctx: _Context, *op_types: str) -> Iterator[onnx.NodeProto]:
    """Nodes of the default ONNX domain with one of the given op types, subgraphs included."""
    for node in ctx.nodes:
        if node.op_type in op_types and node.domain in DEFAULT_DOMAINS:
            yield node


def _finding(rule: str, severity: str, node: onnx.NodeProto, message: str) -> Finding:
    return Finding(rule=rule, severity=severity, node=_label(node), op_type=node.op_type, message=message)


def _input(node: onnx.NodeProto, index: int) -> str:
    """Name of an optional input, "" when absent."""
    return node.input[index] if len(node.input) > index else ""


# ----------------------------------------------------------------------------------------------------------
# Rules


def rule_scatternd_reduction(ctx: _Context) -> Iterator[Finding]:
    """ScatterND with reduction other than "none" (dynamo's export of index_put(accumulate=True)).

    onnx-tensorrt operators.md (TensorRT 10.x), ScatterND row: "`reduction` other than `none` is not
    supported". Before that note existed, TensorRT 8.6 lowered ScatterND to IScatterLayer and silently
    dropped the reduction (onnx/onnx-tensorrt#957).
    """
    for node in _ops(ctx, "ScatterND"):
        reduction = _attr(node, "reduction", "none")
        if reduction != "none":
            yield _finding(
                "scatternd-reduction",
                ERROR,
                node,
                f"ScatterND reduction='{reduction}' is not supported by TensorRT's parser; "
                "rewrite the accumulation (e.g. ScatterElements with reduction on flattened indices, or a plugin)",
            )


def rule_index_put_accumulate(ctx: _Context) -> Iterator[Finding]:
    """The legacy exporter's index_put(accumulate=True): ScatterND(reduction none) onto zeros, then Add.

    torch's TorchScript exporter (symbolic_opset11.index_put) lowers accumulate=True to
    `Add(self, ScatterND(ConstantOfShape(0), idx, values))`. ScatterND without reduction requires unique
    indices (ONNX spec) and keeps one update per duplicate, so repeated indices (several points in one
    BEV cell) are not summed: wrong results in ONNX Runtime and TensorRT alike, with no error anywhere.
    """
    for node in _ops(ctx, "ScatterND"):
        if _attr(node, "reduction", "none") != "none" or not node.input:
            continue
        feeds_add = any(c.op_type == "Add" for c in ctx.consumers.get(node.output[0], []))
        if feeds_add and _is_all_zeros(ctx, node.input[0]):
            yield _finding(
                "index-put-accumulate",
                ERROR,
                node,
                "looks like the legacy exporter's index_put(accumulate=True) (ScatterND onto zeros + Add): "
                "repeated indices are overwritten, not summed; unless indices are unique, use scatter_add "
                "(ScatterElements reduction='add')",
            )


def _is_all_zeros(ctx: _Context, name: str, depth: int = 4) -> bool:
    """True when `name` is a zeros tensor: ConstantOfShape(0) or an all-zero constant, maybe via Cast/Expand."""
    value = ctx.const_value(name)
    if value is not None:
        return value.size > 0 and not np.any(value)
    producer = ctx.producers.get(name)
    if producer is None or depth == 0:
        return False
    if producer.op_type == "ConstantOfShape":
        fill = _attr(producer, "value")  # absent means a float 0
        return fill is None or not np.any(numpy_helper.to_array(fill))
    if producer.op_type in _ZERO_PASSTHROUGH_OPS and producer.input:
        return _is_all_zeros(ctx, producer.input[0], depth - 1)
    return False


def rule_scatternd_duplicate_indices(ctx: _Context) -> Iterator[Finding]:
    """ScatterND(reduction none) whose constant indices repeat a position.

    The ONNX spec for ScatterND requires unique indices when reduction is "none"; with duplicates the result
    depends on the backend's write order (last-write-wins at best), so TensorRT may disagree with the model.
    """
    for node in _ops(ctx, "ScatterND"):
        if _attr(node, "reduction", "none") != "none":
            continue
        indices = ctx.const_value(_input(node, 1))
        if indices is None or indices.ndim == 0 or indices.size == 0:
            continue
        rows = indices.reshape(-1, indices.shape[-1])
        if len(np.unique(rows, axis=0)) < len(rows):
            yield _finding(
                "scatternd-duplicate-indices",
                ERROR,
                node,
                "constant ScatterND indices contain duplicates with reduction='none': the result is "
                "write-order dependent (not a sum); deduplicate or use a reduction",
            )


def rule_scatterelements_plugin(ctx: _Context) -> Iterator[Finding]:
    """ScatterElements with a reduction runs through the ScatterElements plugin, which wants INT64 indices.

    TensorRT 10.0 release notes: the parser "added support for the reduction attribute in ScatterElements"
    via "a new plugin ... in compliance with ONNX ScatterElements"; 10.3 moved the importer to plugin
    version 2 (IPluginV3). The plugin README (NVIDIA/TensorRT plugin/scatterElementsPlugin) says
    reduce="none" is in TRT core, and under known issues: "ONNX spec allows Tind=int32: only INT64 is
    supported by this plugin"; BF16/INT8 data are not supported either.
    """
    for node in _ops(ctx, "ScatterElements"):
        reduction = _attr(node, "reduction", "none")
        if reduction == "none":
            continue
        yield _finding(
            "scatterelements-plugin",
            WARNING,
            node,
            f"ScatterElements reduction='{reduction}' is imported as TensorRT's ScatterElements plugin: load "
            "libnvinfer_plugin (initLibNvInferPlugins / trt.init_libnvinfer_plugins) when building and running",
        )
        if ctx.elem_types.get(_input(node, 1)) == TensorProto.INT32:
            yield _finding(
                "scatter-int32-indices",
                ERROR,
                node,
                "the ScatterElements plugin only accepts INT64 indices; export the indices as int64",
            )


def rule_topk(ctx: _Context) -> Iterator[Finding]:
    """TopK limits: K < 3840 and sorted=1.

    onnx-tensorrt operators.md (TensorRT 10.x), TopK row: "`sorted` must be 1. `K` input must be less
    than 3840." ITopKLayer accepts a dynamic K tensor in TensorRT 10, but then the limit cannot be checked
    before the build (older parsers required K to be an initializer).
    """
    for node in _ops(ctx, "TopK"):
        if _attr(node, "sorted", 1) == 0:
            yield _finding("topk-unsorted", ERROR, node, "TopK with sorted=0 is not supported; use sorted=1")
        k_name = _input(node, 1)
        k_value = ctx.const_value(k_name) if k_name else np.array(_attr(node, "k", -1))  # opset < 10: attribute
        if k_value is None or k_value.size != 1:
            yield _finding(
                "topk-dynamic-k",
                WARNING,
                node,
                f"K is not a build-time constant; TensorRT requires K < {TOPK_K_LIMIT}, make K an initializer",
            )
        elif int(k_value.reshape(-1)[0]) >= TOPK_K_LIMIT:
            yield _finding(
                "topk-too-large",
                ERROR,
                node,
                f"TopK K={int(k_value.reshape(-1)[0])} but TensorRT requires K < {TOPK_K_LIMIT}; "
                "pre-filter (e.g. threshold or a two-stage TopK) to shrink K",
            )


def rule_unsupported_op(ctx: _Context) -> Iterator[Finding]:
    """Ops the parser rejects, plus ops that need data-dependent shapes, which our static deployment forbids.

    operators.md (TensorRT 10.x) marks the ops in UNSUPPORTED_OPS "N". NonZero is "Y" since TensorRT 8.5
    (onnx-tensorrt changelog) but its output length depends on the data, which a static-shape engine cannot
    express (ONNX Runtime's TensorRT EP also notes slowdowns for such ops in TensorRT 10). Loop row: "Scan
    output length cannot be dynamic", so a Loop with scan outputs needs a constant trip count.
    """
    for node in _ops(ctx, *UNSUPPORTED_OPS):
        yield _finding("unsupported-op", ERROR, node, f"{node.op_type} is not supported by TensorRT's ONNX parser")
    for node in _ops(ctx, "NonZero"):
        yield _finding(
            "unsupported-op",
            ERROR,
            node,
            "NonZero has a data-dependent output shape; our static-shape deployment cannot use it "
            "(use a fixed-size mask or TopK over a score instead)",
        )
    for node in _ops(ctx, "Loop"):
        n_scan_outputs = len(node.output) - max(len(node.input) - 2, 0)
        trip_count = _input(node, 0)
        if n_scan_outputs > 0 and (not trip_count or ctx.const_value(trip_count) is None):
            yield _finding(
                "unsupported-op",
                ERROR,
                node,
                "Loop with scan outputs and a data-dependent trip count: TensorRT needs a constant scan "
                "output length; make the trip count an initializer",
            )


def rule_custom_op(ctx: _Context) -> Iterator[Finding]:
    """Nodes outside the default ONNX domain (custom ops), unless the model defines them as local functions.

    The parser only knows the operators in operators.md; for any other node it looks for a TensorRT plugin
    registered under the same name, so the plugin must be built and loaded on the Jetson. Model-local
    functions are expanded by the TensorRT 10 parser (10.7 changelog: plugins are preferred over local
    functions "when a corresponding plugin is available").
    """
    for node in ctx.nodes:
        if node.domain in DEFAULT_DOMAINS or (node.domain, node.op_type) in ctx.local_functions:
            continue
        yield _finding(
            "custom-op",
            WARNING,
            node,
            f"custom op in domain '{node.domain}': TensorRT needs a plugin named '{node.op_type}' "
            "registered at build and run time",
        )


def rule_dynamic_shape(ctx: _Context) -> Iterator[Finding]:
    """Graph inputs (error) and outputs (warning) with symbolic or missing dimensions.

    Our Jetson engines are built with static shapes; a symbolic input dimension would need optimization
    profiles (--minShapes/--optShapes/--maxShapes). A symbolic output usually means a data-dependent op
    upstream.
    """
    graph = ctx.model.graph
    initializers = {init.name for init in graph.initializer}  # IR < 4 lists initializers among the inputs
    for value, severity, kind in [
        *((v, ERROR, "input") for v in graph.input if v.name not in initializers),
        *((v, WARNING, "output") for v in graph.output),
    ]:
        problem = _dynamic_dims(value)
        if problem:
            yield Finding(
                rule="dynamic-shape",
                severity=severity,
                node=value.name,
                op_type=f"graph-{kind}",
                message=f"graph {kind} '{value.name}' {problem}; export with fixed shapes for TensorRT",
            )


def _dynamic_dims(value: onnx.ValueInfoProto) -> str:
    """Describe the non-static part of a tensor's shape, or "" when fully static."""
    if not value.type.HasField("tensor_type"):
        return "is not a tensor"
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return "has no shape (unknown rank)"
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    if all(isinstance(d, int) and d > 0 for d in dims):
        return ""
    return f"has dynamic dims {dims}"


def rule_fp16_risky(ctx: _Context) -> Iterator[Finding]:
    """With --fp16, ops that should stay FP32: running sums, long reductions, Exp/Log/Pow.

    FP16 has a 5-bit exponent (max 65504) and 10-bit mantissa (TensorRT "Accuracy Considerations"); the
    "Improving Model Accuracy" guide says to keep sensitive layers in higher precision through layer
    precision constraints. Our own BEV-pooling cumsum measured about 5% of the mean output as FP16 error.
    """
    if not ctx.fp16:
        return
    for node in _ops(ctx, *FP16_RISKY_OPS):
        yield _finding(
            "fp32-only",
            WARNING,
            node,
            f"{node.op_type} in FP16: {FP16_RISKY_OPS[node.op_type]}; pin it to FP32 "
            f"(trtexec --precisionConstraints=obey --layerPrecisions={_label(node)}:fp32)",
        )


def rule_double(ctx: _Context) -> Iterator[Finding]:
    """DOUBLE tensors anywhere: TensorRT has no FP64.

    operators.md (TensorRT 10.x): "There is limited support for DOUBLE type. TensorRT will attempt to cast
    DOUBLE down to FLOAT, clamping values to +-FLT_MAX if necessary." Works, but precision silently drops
    and the cast costs time: export in float32.
    """
    doubles = {name for name, elem in ctx.elem_types.items() if elem == TensorProto.DOUBLE}
    for node in _ops(ctx, "Cast"):
        if _attr(node, "to") == TensorProto.DOUBLE and node.output:
            doubles.add(node.output[0])
    for name in sorted(doubles):
        producer = ctx.producers.get(name)
        op_type = producer.op_type if producer is not None else "tensor"
        yield Finding(
            rule="double",
            severity=WARNING,
            node=name,
            op_type=op_type,
            message=f"tensor '{name}' is DOUBLE; TensorRT casts FP64 to FP32 (clamped), export it as float32",
        )


def rule_opset(ctx: _Context) -> Iterator[Finding]:
    """Default-domain opset within what TensorRT 10.x parses; reductions need opset >= 16.

    operators.md: TensorRT 10.0 supports "the inclusive range of opset 9 to opset 20", TensorRT 10.15
    "opset 9 to opset 24". Between 21 and 24 support depends on the 10.x release on the device (JetPack
    6.1 ships 10.3), hence a warning. The `reduction` attribute of ScatterElements/ScatterND only exists
    from opset 16 (ONNX operator changelog), so an older model carrying it is malformed.
    """
    opset = ctx.opset
    if opset is None:
        yield Finding("opset", ERROR, "<model>", "opset_import", "the model does not import the default ONNX domain")
        return
    if opset < MIN_OPSET or opset > MAX_OPSET_TRT_10_LATEST:
        yield Finding(
            "opset",
            ERROR,
            "<model>",
            "opset_import",
            f"opset {opset} is outside TensorRT 10.x's supported range {MIN_OPSET}-{MAX_OPSET_TRT_10_LATEST}; "
            f"re-export with opset 17",
        )
    elif opset > MAX_OPSET_TRT_10_0:
        yield Finding(
            "opset",
            WARNING,
            "<model>",
            "opset_import",
            f"opset {opset} > {MAX_OPSET_TRT_10_0} is only parsed by newer TensorRT 10.x releases; check "
            "operators.md for the TensorRT on the Jetson or re-export with opset <= 20",
        )
    if opset < 16:
        for node in _ops(ctx, "ScatterElements", "ScatterND"):
            if _attr(node, "reduction") is not None:
                yield _finding(
                    "opset",
                    WARNING,
                    node,
                    f"'reduction' on {node.op_type} needs opset >= 16 but the model uses opset {opset}; "
                    "the attribute may be ignored",
                )


# TensorRT 10 explicit quantization ("Working with Quantized Types", Q/DQ layer placement): INT8 is symmetric
# (zero-point 0, INT8), activations per tensor, weights per tensor or per output channel (axis 0 of a
# Conv/Gemm-like weight, axis 1 of a ConvTranspose weight), scales build-time constants and positive, and a
# QuantizeLinear feeds DequantizeLinear only (TensorRT fuses the pair into the neighbouring layers).
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def _qdq_source(ctx: _Context, name: str) -> np.ndarray | None:
    """The constant behind a Q/DQ input (through a Q of a constant weight), or None for activations."""
    value = ctx.const_value(name)
    if value is not None:
        return value
    producer = ctx.producers.get(name)
    if producer is not None and producer.op_type == "QuantizeLinear":
        return ctx.const_value(producer.input[0])
    return None


def rule_qdq_int8(ctx: _Context) -> Iterator[Finding]:
    """QuantizeLinear/DequantizeLinear in the form TensorRT 10's explicit INT8 accepts.

    TensorRT developer guide, "Explicit Quantization": only symmetric quantization (zero-point 0), INT8
    for integer Q/DQ, scales that are build-time constants (positive), per-tensor activations and
    per-channel weights on the output-channel axis; a Q must be followed by DQ.
    """
    for node in _ops(ctx, *_QDQ_OPS):
        scale_name, zero_name = _input(node, 1), _input(node, 2)
        scale = ctx.const_value(scale_name)
        if scale is None:
            yield _finding("qdq-scale", ERROR, node, f"scale {scale_name!r} is not a constant initializer")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            yield _finding("qdq-scale", ERROR, node, f"scale {scale_name!r} has values <= 0 or non-finite")
        if not zero_name:
            yield _finding(
                "qdq-zero-point", WARNING, node, "no zero-point: ONNX then means UINT8; give an INT8 zero-point 0"
            )
        else:
            zero = ctx.const_value(zero_name)
            if zero is None:
                yield _finding("qdq-zero-point", ERROR, node, f"zero-point {zero_name!r} is not a constant")
            else:
                if zero.dtype != np.int8:
                    yield _finding("qdq-int8", ERROR, node, f"zero-point type {zero.dtype} (TensorRT INT8 needs int8)")
                if np.any(zero != 0):
                    yield _finding("qdq-zero-point", ERROR, node, "non-zero zero-point: TensorRT INT8 is symmetric")
        source = _qdq_source(ctx, node.input[0])
        if scale.size > 1:
            axis = int(_attr(node, "axis", 1))
            if source is None:
                yield _finding(
                    "qdq-axis", ERROR, node, "per-channel scale on an activation: TensorRT needs per-tensor there"
                )
                continue
            rank = source.ndim
            if not -rank <= axis < rank or source.shape[axis] != scale.size:
                yield _finding(
                    "qdq-axis",
                    ERROR,
                    node,
                    f"axis {axis} does not fit weight shape {source.shape} / {scale.size} scales",
                )
                continue
            axis %= rank
            if node.op_type == "DequantizeLinear":
                for consumer in ctx.consumers.get(node.output[0], []):
                    wanted = _WEIGHT_AXIS.get(consumer.op_type)
                    if wanted is not None and _input(consumer, 1) == node.output[0] and axis != wanted:
                        yield _finding(
                            "qdq-axis",
                            ERROR,
                            node,
                            f"{consumer.op_type} weight quantized on axis {axis}; TensorRT needs its output "
                            f"channels, axis {wanted}",
                        )


def rule_qdq_pairs(ctx: _Context) -> Iterator[Finding]:
    """Every QuantizeLinear feeds DequantizeLinear nodes only, with the same scale (TensorRT fuses Q/DQ pairs;
    a dangling Q leaves an INT8 tensor the next layer cannot take). A DQ reads a Q or an INT8 constant."""
    for node in _ops(ctx, "QuantizeLinear"):
        consumers = ctx.consumers.get(node.output[0], [])
        if not consumers or any(c.op_type != "DequantizeLinear" for c in consumers):
            others = sorted({c.op_type for c in consumers if c.op_type != "DequantizeLinear"}) or ["nothing"]
            yield _finding("qdq-pair", ERROR, node, f"QuantizeLinear feeds {', '.join(others)}, not DequantizeLinear")
            continue
        scale = ctx.const_value(_input(node, 1))
        for consumer in consumers:
            other = ctx.const_value(_input(consumer, 1))
            if scale is not None and other is not None and (scale.shape != other.shape or np.any(scale != other)):
                yield _finding("qdq-pair", ERROR, consumer, "DequantizeLinear scale differs from its QuantizeLinear's")
    for node in _ops(ctx, "DequantizeLinear"):
        producer = ctx.producers.get(node.input[0])
        if producer is not None and producer.op_type == "QuantizeLinear":
            continue
        value = ctx.const_value(node.input[0])
        if value is None or value.dtype != np.int8:
            yield _finding(
                "qdq-pair", ERROR, node, "DequantizeLinear reads neither a QuantizeLinear nor an INT8 constant"
            )


Rule = Callable[[_Context], Iterator[Finding]]

RULES: list[Rule] = [
    rule_scatternd_reduction,
    rule_index_put_accumulate,
    rule_scatternd_duplicate_indices,
    rule_scatterelements_plugin,
    rule_topk,
    rule_unsupported_op,
    rule_custom_op,
    rule_dynamic_shape,
    rule_fp16_risky,
    rule_double,
    rule_opset,
    rule_qdq_int8,
    rule_qdq_pairs,
]


def main(argv: list[str] | None = None) -> int:
    """Command line: print the report; exit status 1 when there is at least one error."""
    parser = argparse.ArgumentParser(description="Check an ONNX model for TensorRT 10.x (Jetson) readiness.")
    parser.add_argument("model", help="path to the .onnx file (external data next to it is loaded)")
    parser.add_argument("--fp16", action="store_true", help="also flag ops that are risky in FP16")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.model):
        print(f"error: {args.model} does not exist or is not a file", file=sys.stderr)
        return 2
    try:
        findings = check_model(args.model, fp16=args.fp16)
    except Exception as error:  # noqa: BLE001 - a file onnx cannot parse: say so in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {args.model} is not a readable ONNX model ({reason})", file=sys.stderr)
        return 2
    print(format_findings(findings))
    return 1 if any(f.severity == ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
