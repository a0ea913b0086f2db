"""Build TensorRT engines from our ONNX exports, reproducibly, with TensorRT 10 or 11.

Why it looks like this:

* An engine only runs on the GPU model and TensorRT version that built it, so a Jetson Orin
  engine must be built on the Orin. Every build therefore also yields the equivalent `trtexec`
  command line (`trtexec_command`) and a JSON sidecar next to the engine that records versions,
  hashes, shapes and that command, so an engine on disk can always be traced and rebuilt.
* `tensorrt` is imported lazily. Without it (a CI box, a laptop) everything but the build still
  works, and `build_engine` fails with `TensorRTUnavailable` whose message is the command to run
  on the target instead.
* Shapes are static. BEVFusion-style models are deployed at one camera/LiDAR configuration, and a
  static engine is the fastest and the only kind DLA runs. A dynamic ONNX input is accepted only
  when `EngineSpec.input_shapes` pins it; TensorRT then gets a profile with min == opt == max.
* Precision, TensorRT 10 vs 11. TensorRT 10 (JetPack 6 on Orin ships 10.3) builds *weakly typed*
  networks by default: `BuilderFlag.FP16`/`INT8` let the builder pick lower-precision kernels.
  TensorRT 11 removed weak typing: every network is strongly typed and precision comes from the
  ONNX graph itself (FP16 via ModelOpt AutoCast, INT8 via Q/DQ nodes). `EngineSpec.strongly_typed`
  selects the mode; on TensorRT 11 a weakly typed FP16/INT8 request is refused with that advice.
* INT8 is explicit quantization only: Q/DQ nodes in the ONNX, never calibrators (deprecated in
  10.1, removed in 11). A weakly typed Q/DQ build still needs `BuilderFlag.INT8` on TensorRT 10;
  we also allow FP16 there so the layers left unquantized do not fall back to FP32.
* CumSum stays in FP32. The cumsum form of BEV pooling loses about 5 % accuracy when its prefix
  sums run in FP16, so weakly typed reduced-precision builds pin every cumulative layer to FP32
  (`layer.precision`, `set_output_type`, `OBEY_PRECISION_CONSTRAINTS`). In strongly typed mode the
  graph already decides: keep CumSum out of the FP16 conversion (AutoCast `op_types_to_exclude`).
* Plugins. Our BEV pooling scatters with `ScatterElements(reduction="add")`, which the ONNX parser
  maps onto the `ScatterElements` plugin of libnvinfer_plugin (only reduction "none" is a native
  layer), so the plugin registry is initialised before parsing (`init_libnvinfer_plugins`).
* Files are written atomically (temporary file in the same directory, then `os.replace`): a crash
  or a full disk never leaves a truncated engine where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from common.io import atomic_write_bytes, atomic_write_text

from .runtime import TensorRTUnavailable, cuda_device_name, import_tensorrt

__all__ = [
    "PRECISIONS",
    "EngineBuildError",
    "EngineSpec",
    "TensorRTUnavailable",
    "build_engine",
    "engine_input_shapes",
    "read_onnx_io",
    "sidecar",
    "sidecar_path",
    "trtexec_command",
    "write_sidecar",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8-qdq")
MAX_BUILDER_OPTIMIZATION_LEVEL = 5
SIDECAR_SCHEMA = 1

Shape = tuple[int, ...]


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


@dataclass
class EngineSpec:
    """Everything that determines an engine; two equal specs on one device give equivalent engines."""

    onnx_path: Path | str
    engine_path: Path | str
    precision: str = "fp16"  # "fp32" | "fp16" | "int8-qdq" (Q/DQ nodes in the ONNX)
    workspace_mib: int = 4096
    timing_cache: Path | str | None = None  # loaded if present, (re)written after the build
    input_shapes: Mapping[str, tuple[int, ...]] | None = None  # None: the static shapes in the ONNX
    plugins: bool = True  # initialise libnvinfer_plugin (ScatterElements with reduction needs it)
    builder_optimization_level: int = 3  # 0..5, TensorRT's default is 3
    dla_core: int | None = None  # Jetson DLA core; unsupported layers fall back to the GPU
    strongly_typed: bool = False  # precision from the ONNX graph; the only mode TensorRT 11 has

    def __post_init__(self) -> None:
        self.onnx_path = Path(self.onnx_path)
        self.engine_path = Path(self.engine_path)
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if int(self.workspace_mib) <= 0:
            raise ValueError(f"workspace_mib must be positive, got {self.workspace_mib}")
        if not 0 <= int(self.builder_optimization_level) <= MAX_BUILDER_OPTIMIZATION_LEVEL:
            raise ValueError(
                f"builder_optimization_level must be in 0..{MAX_BUILDER_OPTIMIZATION_LEVEL}, "
                f"got {self.builder_optimization_level}"
            )
        if self.dla_core is not None:
            if int(self.dla_core) < 0:
                raise ValueError(f"dla_core must be >= 0, got {self.dla_core}")
            if self.precision == "fp32":
                raise ValueError("DLA executes FP16 or INT8 only; use precision 'fp16' or 'int8-qdq' with dla_core")
        if self.input_shapes is not None:
            self.input_shapes = {name: _static_shape(name, dims) for name, dims in self.input_shapes.items()}

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(Path(self.engine_path))


def sidecar_path(engine_path: Path) -> Path:
    """`bev.engine` -> `bev.engine.json`."""
    return engine_path.with_name(engine_path.name + ".json")


def _static_shape(name: str, dims: Any) -> Shape:
    shape = tuple(int(d) for d in dims)
    if any(d <= 0 for d in shape):
        raise ValueError(f"input '{name}': shape {shape} must be static with positive dimensions")
    return shape


# --------------------------------------------------------------------------------------------
# Reading the ONNX graph (the `onnx` package only)
# --------------------------------------------------------------------------------------------

# A dimension is an int when the graph fixes it, or the symbolic name / None when it does not.
_Dim = int | str | None


@dataclass(frozen=True)
class _OnnxGraph:
    inputs: dict[str, tuple[tuple[_Dim, ...], str]]
    outputs: dict[str, tuple[tuple[_Dim, ...], str]]
    cumsum_nodes: tuple[str, ...]


def _load_graph(onnx_path: Path) -> _OnnxGraph:
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    # The graph structure is all we need; external weight files (> 2 GB models) stay on disk.
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}  # IR < 4 lists weights as inputs too
    return _OnnxGraph(
        inputs={vi.name: _value_info(vi) for vi in graph.input if vi.name not in initializers},
        outputs={vi.name: _value_info(vi) for vi in graph.output},
        cumsum_nodes=tuple(node.name for node in graph.node if node.op_type == "CumSum"),
    )


def _value_info(vi: onnx.ValueInfoProto) -> tuple[tuple[_Dim, ...], str]:
    tensor_type = vi.type.tensor_type
    dims: list[_Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return tuple(dims), _dtype_name(tensor_type.elem_type)


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):  # e.g. bfloat16 / float8, which numpy lacks
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _is_static(dims: tuple[_Dim, ...]) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _dynamic_axis(dims: tuple[_Dim, ...]) -> tuple[int, _Dim]:
    return next((i, d) for i, d in enumerate(dims) if not (isinstance(d, int) and d > 0))


def read_onnx_io(onnx_path: Path | str) -> tuple[dict[str, tuple[Shape, str]], dict[str, tuple[Shape, str]]]:
    """Static input and output shapes and numpy dtype names of an ONNX graph.

    Returns `(inputs, outputs)`, each `{name: (shape, dtype)}` in graph order, e.g.
    `{"images": ((1, 6, 3, 256, 704), "float32")}`. A dynamic or symbolic input dimension raises
    `ValueError` naming the input; an output dimension the graph leaves open is reported as -1.
    """
    graph = _load_graph(Path(onnx_path))
    inputs: dict[str, tuple[Shape, str]] = {}
    for name, (dims, dtype) in graph.inputs.items():
        if not _is_static(dims):
            axis, dim = _dynamic_axis(dims)
            raise ValueError(
                f"ONNX input '{name}' has dynamic dimension {dim!r} at axis {axis} of {list(dims)}; "
                "export with static shapes or set EngineSpec.input_shapes"
            )
        inputs[name] = (tuple(int(d) for d in dims), dtype)
    outputs = {name: (_open_dims(dims), dtype) for name, (dims, dtype) in graph.outputs.items()}
    return inputs, outputs


def _open_dims(dims: tuple[_Dim, ...]) -> Shape:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


@dataclass(frozen=True)
class _ResolvedInput:
    shape: Shape
    dtype: str
    dynamic_in_onnx: bool  # TensorRT needs an optimization profile / trtexec needs --shapes


def _resolve_inputs(spec: EngineSpec, graph: _OnnxGraph) -> dict[str, _ResolvedInput]:
    overrides = dict(spec.input_shapes or {})
    unknown = sorted(set(overrides) - set(graph.inputs))
    if unknown:
        raise ValueError(f"input_shapes names {unknown} are not inputs of {spec.onnx_path} ({list(graph.inputs)})")
    resolved: dict[str, _ResolvedInput] = {}
    for name, (dims, dtype) in graph.inputs.items():
        dynamic = not _is_static(dims)
        if name in overrides:
            shape = overrides[name]
            _check_override(name, dims, shape)
        elif dynamic:
            axis, dim = _dynamic_axis(dims)
            raise ValueError(
                f"ONNX input '{name}' has dynamic dimension {dim!r} at axis {axis} of {list(dims)}; "
                "give its static shape in EngineSpec.input_shapes"
            )
        else:
            shape = tuple(int(d) for d in dims)
        resolved[name] = _ResolvedInput(shape, dtype, dynamic)
    return resolved


def _check_override(name: str, dims: tuple[_Dim, ...], shape: Shape) -> None:
    if len(shape) != len(dims):
        raise ValueError(f"input '{name}': input_shapes gives rank {len(shape)}, the ONNX graph has rank {len(dims)}")
    for axis, (dim, value) in enumerate(zip(dims, shape, strict=True)):
        if isinstance(dim, int) and dim > 0 and dim != value:
            raise ValueError(f"input '{name}': input_shapes gives {value} at axis {axis}, the ONNX graph fixes {dim}")


def engine_input_shapes(spec: EngineSpec) -> dict[str, Shape]:
    """The static shape every engine input will have: `spec.input_shapes` over the ONNX graph's."""
    return {name: item.shape for name, item in _resolve_inputs(spec, _load_graph(Path(spec.onnx_path))).items()}


# --------------------------------------------------------------------------------------------
# trtexec
# --------------------------------------------------------------------------------------------


def _format_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def _weakly_typed_reduced_precision(spec: EngineSpec) -> bool:
    return not spec.strongly_typed and spec.precision != "fp32"


def _trtexec_args(spec: EngineSpec, graph: _OnnxGraph, inputs: Mapping[str, _ResolvedInput]) -> list[str]:
    args = [
        "trtexec",
        f"--onnx={spec.onnx_path}",
        f"--saveEngine={spec.engine_path}",
        f"--memPoolSize=workspace:{int(spec.workspace_mib)}M",  # base-2 suffix: M = MiB
        f"--builderOptimizationLevel={int(spec.builder_optimization_level)}",
    ]
    # trtexec refuses --shapes for a static model ("Static model does not take explicit shapes"),
    # and --shapes alone makes it build one profile with min = opt = max.
    dynamic = {name: item.shape for name, item in inputs.items() if item.dynamic_in_onnx}
    if dynamic:
        args.append("--shapes=" + ",".join(f"{name}:{_format_shape(shape)}" for name, shape in dynamic.items()))
    if spec.strongly_typed:
        args.append("--stronglyTyped")  # precision comes from the graph; a no-op default on TensorRT 11
    elif spec.precision == "fp16":
        args.append("--fp16")
    elif spec.precision == "int8-qdq":
        args += ["--int8", "--fp16"]  # INT8 where the Q/DQ nodes say so, FP16 allowed elsewhere
    cumsum = [name for name in graph.cumsum_nodes if name]
    if _weakly_typed_reduced_precision(spec) and cumsum:
        # The ONNX parser names a layer after its node, so the CumSum layers can be pinned by name.
        pins = ",".join(f"{name}:fp32" for name in cumsum)
        args += ["--precisionConstraints=obey", f"--layerPrecisions={pins}", f"--layerOutputTypes={pins}"]
    if spec.timing_cache is not None:
        args.append(f"--timingCacheFile={spec.timing_cache}")
    if spec.dla_core is not None:
        args += [f"--useDLACore={int(spec.dla_core)}", "--allowGPUFallback"]
    # No plugin flag: trtexec itself calls initLibNvInferPlugins(logger, ""), so the built-in
    # ScatterElements plugin is registered; --staticPlugins is only for custom plugin .so files.
    return args


def trtexec_command(spec: EngineSpec) -> str:
    """The `trtexec` command line equivalent to `build_engine(spec)`, shell-quoted.

    Run it on the target (e.g. the Jetson), since engines are not portable across GPUs or
    TensorRT versions. Without `--skipInference` trtexec also benchmarks the fresh engine.
    """
    graph = _load_graph(Path(spec.onnx_path))
    return shlex.join(_trtexec_args(spec, graph, _resolve_inputs(spec, graph)))


# --------------------------------------------------------------------------------------------
# Sidecar and atomic writes
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar(
    spec: EngineSpec,
    engine_bytes_hash: str,
    trt_version: str,
    *,
    gpu_name: str | None = None,
    built_at: datetime | None = None,
) -> dict[str, Any]:
    """The JSON-ready record written next to an engine as `<engine>.json`.

    `onnx.sha256` covers the .onnx file itself (not external weight files); dtypes are those the
    ONNX graph declares for the engine's inputs and outputs.
    """
    graph = _load_graph(Path(spec.onnx_path))
    inputs = _resolve_inputs(spec, graph)
    outputs = {name: (_open_dims(dims), dtype) for name, (dims, dtype) in graph.outputs.items()}
    when = built_at or datetime.now(timezone.utc)
    return {
        "schema": SIDECAR_SCHEMA,
        "tensorrt_version": trt_version,
        "precision": spec.precision,
        "strongly_typed": spec.strongly_typed,
        "workspace_mib": int(spec.workspace_mib),
        "builder_optimization_level": int(spec.builder_optimization_level),
        "dla_core": spec.dla_core,
        "plugins": spec.plugins,
        "inputs": [{"name": n, "shape": list(item.shape), "dtype": item.dtype} for n, item in inputs.items()],
        "outputs": [{"name": n, "shape": list(shape), "dtype": dtype} for n, (shape, dtype) in outputs.items()],
        "onnx": {"path": str(spec.onnx_path), "sha256": _sha256_file(Path(spec.onnx_path))},
        "engine": {"path": str(spec.engine_path), "sha256": engine_bytes_hash},
        "trtexec_command": shlex.join(_trtexec_args(spec, graph, inputs)),
        "gpu": gpu_name,
        "built_at": when.isoformat(timespec="seconds"),
        "note": "engines run only on the GPU model and TensorRT version that built them; rebuild with trtexec_command",
    }


def write_sidecar(path: Path | str, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON to `path`, atomically."""

    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------
# Building with the TensorRT Python API
# --------------------------------------------------------------------------------------------


def _check_paths(spec: EngineSpec) -> None:
    onnx_path = Path(spec.onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    for what, target in (("engine", spec.engine_path), ("timing cache", spec.timing_cache)):
        if target is not None and not Path(target).parent.is_dir():
            raise FileNotFoundError(f"output directory for the {what} does not exist: {Path(target).parent}")


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps errors for the exception message."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(" ".join(str(msg).split()))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.INFO:
                log.info("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _supports_weak_typing(trt: ModuleType) -> bool:
    return hasattr(trt.BuilderFlag, "FP16")  # removed together with weak typing in TensorRT 11


def _create_network(trt: ModuleType, builder: Any, spec: EngineSpec) -> Any:
    flags = 0  # explicit batch is the only mode since TensorRT 10; its flag is deprecated / removed
    if spec.strongly_typed:
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # accepted and ignored by TensorRT 11, where it is always on
            flags |= 1 << int(strongly_typed)
    return builder.create_network(flags)


def _parse_onnx(trt: ModuleType, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + " | ".join(errors or ["no parser error"]))
    return parser  # keep alive: the network references weights the parser owns


def _pin_cumsum_fp32(trt: ModuleType, network: Any, cumsum_nodes: tuple[str, ...]) -> list[str]:
    """Force cumulative-sum layers to compute and output FP32 in a weakly typed build."""
    cumulative = getattr(trt.LayerType, "CUMULATIVE", None)
    names = {name for name in cumsum_nodes if name}
    float_types = (trt.float32, trt.float16)
    pinned: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not (layer.type == cumulative or layer.name in names):
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in float_types]
        if not float_outputs:
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    if cumsum_nodes and not pinned:
        log.warning("the ONNX graph has CumSum nodes %s but no TensorRT layer was pinned to FP32", list(cumsum_nodes))
    return pinned


def _configure_precision(trt: ModuleType, network: Any, config: Any, spec: EngineSpec, graph: _OnnxGraph) -> None:
    if spec.strongly_typed or spec.precision == "fp32":
        return  # strongly typed: the graph's types decide; fp32: nothing to enable
    if not _supports_weak_typing(trt):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} has no weak typing, so precision '{spec.precision}' cannot be a builder flag: "
            "put the precision into the ONNX (ModelOpt AutoCast for FP16, Q/DQ nodes for INT8, CumSum kept FP32) "
            "and set EngineSpec(strongly_typed=True)"
        )
    config.set_flag(trt.BuilderFlag.FP16)
    if spec.precision == "int8-qdq":
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ placement decides where INT8 is used; no calibrator
    if _pin_cumsum_fp32(trt, network, graph.cumsum_nodes):
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)


def _configure_dla(trt: ModuleType, builder: Any, config: Any, dla_core: int) -> None:
    if dla_core >= builder.num_DLA_cores:
        raise EngineBuildError(f"DLA core {dla_core} requested but this device has {builder.num_DLA_cores} DLA cores")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def _add_profile(builder: Any, network: Any, config: Any, inputs: Mapping[str, _ResolvedInput]) -> None:
    """Pin dynamic ONNX inputs to their static shape (min = opt = max); a static network needs no profile."""
    dynamic = {name: item.shape for name, item in inputs.items() if item.dynamic_in_onnx}
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name in dynamic:
            profile.set_shape(name, dynamic[name], dynamic[name], dynamic[name])
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimization profile {dynamic}")


def _load_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(data), False):
        # Written by another GPU or TensorRT version: start afresh rather than trust its timings.
        log.warning("timing cache %s does not match this device or TensorRT version; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is not None:
        atomic_write_bytes(path, memoryview(config.get_timing_cache().serialize()))


def _gpu_name() -> str | None:
    try:
        return cuda_device_name(0)
    except Exception:  # cuda-python missing or no device: the sidecar just says null
        return None


def build_engine(spec: EngineSpec) -> Path:
    """Build `spec.engine_path` from `spec.onnx_path` and write `<engine>.json` next to it.

    Raises `FileNotFoundError` for a missing ONNX file or output directory (before any work),
    `ValueError` for unusable shapes, `TensorRTUnavailable` (message: the trtexec command to run on
    the target) when TensorRT is not installed, and `EngineBuildError` when parsing or building fails.
    """
    _check_paths(spec)
    graph = _load_graph(Path(spec.onnx_path))
    inputs = _resolve_inputs(spec, graph)
    command = shlex.join(_trtexec_args(spec, graph, inputs))
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as exc:
        raise TensorRTUnavailable(f"{exc}; build the engine on the target instead: {command}") from exc

    logger = _make_logger(trt)
    if spec.plugins:
        if not trt.init_libnvinfer_plugins(logger, ""):
            raise EngineBuildError("could not initialise the TensorRT plugin library (libnvinfer_plugin)")
    builder = trt.Builder(logger)
    network = _create_network(trt, builder, spec)
    parser = _parse_onnx(trt, network, logger, Path(spec.onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mib) << 20)
    config.builder_optimization_level = int(spec.builder_optimization_level)
    _configure_precision(trt, network, config, spec, graph)
    if spec.dla_core is not None:
        _configure_dla(trt, builder, config, int(spec.dla_core))
    _add_profile(builder, network, config, inputs)
    timing_cache = Path(spec.timing_cache) if spec.timing_cache is not None else None
    _load_timing_cache(config, timing_cache)

    log.info("building %s engine %s (TensorRT %s)", spec.precision, spec.engine_path, trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        details = " | ".join(logger.errors[-5:]) or "see the TensorRT log"
        raise EngineBuildError(f"TensorRT failed to build {spec.engine_path}: {details}")
    del parser

    engine = memoryview(serialized)
    engine_path = Path(spec.engine_path)
    atomic_write_bytes(engine_path, engine)
    _save_timing_cache(config, timing_cache)
    record = sidecar(spec, hashlib.sha256(engine).hexdigest(), trt.__version__, gpu_name=_gpu_name())
    write_sidecar(sidecar_path(engine_path), record)
    log.info("wrote %s (%.1f MiB) and %s", engine_path, engine.nbytes / 2**20, sidecar_path(engine_path).name)
    return engine_path
