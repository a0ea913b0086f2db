"""The ONNX Runtime CPU deployment form of a TensorRT-style Q/DQ graph.

Why: the graph `export.quantize` produces is the form TensorRT wants (symmetric INT8 activations,
zero-point 0, a Relu between each Conv and the next Q). ONNX Runtime's CPU provider runs that graph but
fuses almost nothing into integer kernels (measured on the `small` preset: 0 of 59 convs became
QLinearConv), because (a) it drops a Relu in front of a Q only when the Q's zero-point is the type's
minimum (uint8 0 / int8 -128), so DQ -> Conv -> Relu -> Q never looks like DQ -> Conv -> Q, and (b) its x86
integer kernels take uint8 activations. `to_ort_cpu_form` rewrites the activation Q/DQ pairs so that ONNX
Runtime can fuse, keeping the scales:

- every activation Q/DQ pair (int8, zero-point 0) becomes uint8 with zero-point 128, same scale: the same
  grid (q_u8 = q_s8 + 128, both saturating at -128 x scale and 127 x scale), so the values are identical;
- a Q/DQ pair that reads a Relu's output becomes uint8 with zero-point 0, same scale (`relu_uint8`, on by
  default): identical on [0, 127 x scale], but it saturates at 255 x scale instead of 127 x scale, so an
  activation above the calibrated range is clipped later than in the TensorRT graph (measured and
  reported by the caller: `max_abs_vs` in benchmarks/quant.py); this is what lets ONNX Runtime remove the
  Relu and fuse DQ -> Conv -> Q into QLinearConv;
- Cast nodes from float to float (ModelOpt's exporter leaves them where a quantizer input is also read
  elsewhere) are removed, and several Q nodes that then read the same tensor with the same scale and
  zero-point become one (the same computation once; ONNX Runtime's Relu removal wants the Relu to feed a
  single Q).

Weights stay as they are (int8, per channel, zero-point 0: ONNX Runtime's U8S8 kernels take them). This
form is for ONNX Runtime only; TensorRT's parser rejects uint8 Q/DQ (`export.trt_check`, rule qdq-int8).

ONNX Runtime settings, looked up in its `onnxruntime_session_options_config_keys.h` and measured in
benchmarks/quant.py: `session.qdqisint8allowed` ("1" lets the Q/DQ fusions keep int8 activations; meant for
ARM builds) changed nothing on x86 here; `session.x64quantprecision` ("1" switches U8S8 to slower U8U8
kernels, against an overflow on AVX2 without VNNI) only slowed the graph down. Neither is set.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ORT_CPU_FILE = "model_ort_cpu.onnx"  # next to model.onnx in an `altermoma quantize --onnx --ort-cpu` folder


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _is_activation_pair(q: onnx.NodeProto, constants: Mapping[str, np.ndarray]) -> bool:
    """A per-tensor, signed INT8, zero-point 0 Q on a computed tensor (not a weight)."""
    if q.input[0] in constants or len(q.input) < 3:
        return False
    scale, zero = constants.get(q.input[1]), constants.get(q.input[2])
    return (
        scale is not None
        and zero is not None
        and scale.size == 1
        and zero.size == 1
        and zero.dtype == np.int8
        and int(zero.reshape(())) == 0
    )


def _drop_identity_casts(model: onnx.ModelProto) -> int:
    """Remove Cast nodes that cast a float tensor to float (ModelOpt's exporter leaves one per quantizer input
    it routes around), rewiring their readers to the Cast's input: the same values, and a tensor read by two
    quantizers through such Casts becomes one tensor read by two Q nodes, which step 1 then merges."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    inferred = onnx.shape_inference.infer_shapes(model)
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    types.update({i.name: i.data_type for i in graph.initializer})
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to is None or types.get(node.input[0]) != to:
            continue
        for reader in graph.node:
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = node.input[0]
        graph.node.remove(node)
        removed += 1
    return removed


def to_ort_cpu_form(model: onnx.ModelProto, relu_uint8: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A copy of the Q/DQ `model` in ONNX Runtime's CPU deployment form (module docstring), and what changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    identity_casts = _drop_identity_casts(out)
    constants = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # 1. One Q per (tensor, scale, zero-point): duplicates read their first twin's output instead.
    merged = 0
    first: dict[tuple, onnx.NodeProto] = {}
    drop: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or not _is_activation_pair(node, constants):
            continue
        key = (node.input[0], constants[node.input[1]].tobytes(), constants[node.input[2]].tobytes())
        twin = first.setdefault(key, node)
        if twin is node:
            continue
        for reader in consumers.get(node.output[0], []):
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = twin.output[0]
            consumers.setdefault(twin.output[0], []).append(reader)
        drop.append(node)
        merged += 1
    for node in drop:
        graph.node.remove(node)
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # 2. Activation pairs to uint8: zero-point 128 (identical values), or 0 after a Relu (`relu_uint8`).
    zero_128 = "ort_cpu/uint8_zero_point_128"
    zero_0 = "ort_cpu/uint8_zero_point_0"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(128, np.uint8), zero_128),
            numpy_helper.from_array(np.array(0, np.uint8), zero_0),
        ]
    )
    shifted = after_relu = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not _is_activation_pair(node, constants):
            continue
        readers = consumers.get(node.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue  # not a plain Q -> DQ pair: leave it
        producer = producers.get(node.input[0])
        use_zero = zero_0 if relu_uint8 and producer is not None and producer.op_type == "Relu" else zero_128
        node.input[2] = use_zero
        for dq in readers:
            dq.input[2] = use_zero
        if use_zero == zero_0:
            after_relu += 1
        else:
            shifted += 1
    onnx.checker.check_model(out)
    return out, {
        "identity_casts_removed": identity_casts,
        "relu_uint8": relu_uint8,
        "merged_duplicate_q": merged,
        "uint8_zero_point_128": shifted,
        "uint8_zero_point_0_after_relu": after_relu,
    }


FUSED_INTEGER_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QLinearAdd",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QGemm",
    "QLinearAveragePool",
)
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")


def ort_fusion_report(onnx_path: str | os.PathLike, threads: int, out_path: str | os.PathLike) -> dict[str, Any]:
    """Op histogram of the graph ONNX Runtime runs after its optimizations (saved to `out_path` through
    `SessionOptions.optimized_model_filepath`, at ORT_ENABLE_EXTENDED, the highest level that serializes),
    which compute ops were fused into integer kernels and which stayed floating point."""
    import onnxruntime as ort

    from export.onnx import session_options

    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = os.fspath(out_path)
    ort.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(os.fspath(out_path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    ops = Counter(n.op_type for n in graph.node)
    float_compute = []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            src = producers.get(node.input[0])
            float_compute.append(
                {"node": node.name, "op": node.op_type, "input_from": src.op_type if src is not None else "graph input"}
            )
    return {
        "level": "ORT_ENABLE_EXTENDED",
        "ops": dict(ops.most_common()),
        "integer_kernels": {k: ops[k] for k in FUSED_INTEGER_OPS if ops[k]},
        "float_compute_ops": len(float_compute),
        "float_compute": float_compute,
        "quantize_linear_left": ops["QuantizeLinear"],
        "dequantize_linear_left": ops["DequantizeLinear"],
    }


__all__ = ["to_ort_cpu_form", "ort_fusion_report", "FUSED_INTEGER_OPS", "ORT_CPU_FILE"]
