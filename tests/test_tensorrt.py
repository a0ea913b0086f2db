"""Tests for export.tensorrt (engine building), export.runtime (running engines) and export.parity.

Most tests need neither TensorRT nor a GPU: ONNX reading, the trtexec command, the sidecar, the
atomic writer, the error paths of `build_engine`, input checks, latency statistics and parity.
The rest build and run real engines and skip, saying why, without TensorRT or a CUDA device.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shlex
import subprocess
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.parity import compare_outputs
from export.runtime import (
    CudaError,
    CudaUnavailable,
    DeviceBuffer,
    TensorSpec,
    check_inputs,
    cuda_call,
    cuda_device_count,
    import_cudart,
    latency_summary,
)
from export.tensorrt import (
    EngineBuildError,
    EngineSpec,
    TensorRTUnavailable,
    build_engine,
    engine_input_shapes,
    read_onnx_io,
    sidecar,
    trtexec_command,
    write_sidecar,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CUMSUM_NODE = "bev_pool/CumSum"


# --------------------------------------------------------------------------------------------
# Tiny ONNX models (onnx.helper: fast, no torch)
# --------------------------------------------------------------------------------------------


def _conv_relu(
    path: Path,
    *,
    batch: int | str = 1,
    cumsum: bool = False,
    fp16_graph: bool = False,
    output_shape: list[int | str] | None = None,
) -> Path:
    """input[batch,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu [-> CumSum(axis 3)] -> output, opset 17.

    `fp16_graph` computes in FP16 between two Casts with FP32 I/O, which is what ModelOpt AutoCast
    (keep_io_types=True) produces for a strongly typed build.
    """
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.2
    bias = rng.standard_normal(4).astype(np.float32) * 0.1
    compute = np.float16 if fp16_graph else np.float32
    initializers = [
        numpy_helper.from_array(weight.astype(compute), "W"),
        numpy_helper.from_array(bias.astype(compute), "B"),
    ]
    nodes = []
    x = "input"
    if fp16_graph:
        nodes.append(helper.make_node("Cast", ["input"], ["input_fp16"], to=TensorProto.FLOAT16, name="cast_in"))
        x = "input_fp16"
    nodes += [
        helper.make_node("Conv", [x, "W", "B"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
    ]
    last = "relu"
    if cumsum:
        initializers.append(numpy_helper.from_array(np.array(3, dtype=np.int64), "axis"))
        nodes.append(helper.make_node("CumSum", ["relu", "axis"], ["summed"], name=CUMSUM_NODE))
        last = "summed"
    if fp16_graph:
        nodes.append(helper.make_node("Cast", [last], ["output"], to=TensorProto.FLOAT, name="cast_out"))
    else:
        nodes.append(helper.make_node("Identity", [last], ["output"], name="out"))
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, output_shape or [batch, 4, 8, 8])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def static_onnx(tmp_path: Path) -> Path:
    return _conv_relu(tmp_path / "static.onnx")


@pytest.fixture
def dynamic_onnx(tmp_path: Path) -> Path:
    return _conv_relu(tmp_path / "dynamic.onnx", batch="batch")


@pytest.fixture
def cumsum_onnx(tmp_path: Path) -> Path:
    return _conv_relu(tmp_path / "cumsum.onnx", cumsum=True)


def _args(spec: EngineSpec) -> list[str]:
    return shlex.split(trtexec_command(spec))


# --------------------------------------------------------------------------------------------
# read_onnx_io
# --------------------------------------------------------------------------------------------


def test_read_onnx_io_static(static_onnx: Path) -> None:
    inputs, outputs = read_onnx_io(static_onnx)
    assert inputs == {"input": ((1, 3, 8, 8), "float32")}
    assert outputs == {"output": ((1, 4, 8, 8), "float32")}


def test_read_onnx_io_dynamic_input_names_it(dynamic_onnx: Path) -> None:
    with pytest.raises(ValueError, match=r"ONNX input 'input' has dynamic dimension 'batch' at axis 0") as info:
        read_onnx_io(dynamic_onnx)
    assert "\n" not in str(info.value)


def test_read_onnx_io_open_output_dim_is_minus_one(tmp_path: Path) -> None:
    path = _conv_relu(tmp_path / "m.onnx", output_shape=["n", 4, 8, 8])
    _, outputs = read_onnx_io(path)
    assert outputs == {"output": ((-1, 4, 8, 8), "float32")}


def test_read_onnx_io_skips_initializers_listed_as_inputs(tmp_path: Path) -> None:
    path = _conv_relu(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3]))  # IR < 4 style
    onnx.save(model, str(path))
    inputs, _ = read_onnx_io(path)
    assert list(inputs) == ["input"]


def test_read_onnx_io_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        read_onnx_io(tmp_path / "nope.onnx")


# --------------------------------------------------------------------------------------------
# EngineSpec and shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int8"}, "precision must be one of"),
        ({"workspace_mib": 0}, "workspace_mib must be positive"),
        ({"builder_optimization_level": 6}, "builder_optimization_level must be in 0..5"),
        ({"dla_core": -1, "precision": "fp16"}, "dla_core must be >= 0"),
        ({"dla_core": 0, "precision": "fp32"}, "DLA executes FP16 or INT8 only"),
        ({"input_shapes": {"input": (0, 3, 8, 8)}}, "must be static with positive dimensions"),
    ],
)
def test_engine_spec_rejects(static_onnx: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineSpec(static_onnx, tmp_path / "m.engine", **kwargs)


def test_input_shapes_pin_a_dynamic_dim(dynamic_onnx: Path, tmp_path: Path) -> None:
    spec = EngineSpec(dynamic_onnx, tmp_path / "m.engine", input_shapes={"input": [2, 3, 8, 8]})
    assert engine_input_shapes(spec) == {"input": (2, 3, 8, 8)}


def test_dynamic_input_without_override_is_an_error(dynamic_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'input' has dynamic dimension 'batch'.*EngineSpec.input_shapes"):
        trtexec_command(EngineSpec(dynamic_onnx, tmp_path / "m.engine"))


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"input": (1, 4, 8, 8)}, "input_shapes gives 4 at axis 1, the ONNX graph fixes 3"),
        ({"input": (1, 3, 8)}, "rank 3, the ONNX graph has rank 4"),
        ({"images": (1, 3, 8, 8)}, r"names \['images'\] are not inputs"),
    ],
)
def test_input_shapes_must_agree_with_the_graph(static_onnx: Path, tmp_path: Path, shapes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_input_shapes(EngineSpec(static_onnx, tmp_path / "m.engine", input_shapes=shapes))


# --------------------------------------------------------------------------------------------
# trtexec_command
# --------------------------------------------------------------------------------------------


def test_trtexec_fp32_static(static_onnx: Path, tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    args = _args(EngineSpec(static_onnx, engine, precision="fp32"))
    assert args[0] == "trtexec"
    for flag in (
        f"--onnx={static_onnx}",
        f"--saveEngine={engine}",
        "--memPoolSize=workspace:4096M",
        "--builderOptimizationLevel=3",
    ):
        assert flag in args
    for prefix in ("--fp16", "--int8", "--stronglyTyped", "--shapes", "--useDLACore", "--timingCacheFile"):
        assert not any(a.startswith(prefix) for a in args), prefix
    # trtexec rejects --shapes for a static model ("Static model does not take explicit shapes").


def test_trtexec_shapes_for_dynamic_inputs(dynamic_onnx: Path, tmp_path: Path) -> None:
    spec = EngineSpec(dynamic_onnx, tmp_path / "m.engine", precision="fp32", input_shapes={"input": (1, 3, 8, 8)})
    assert "--shapes=input:1x3x8x8" in _args(spec)


def test_trtexec_fp16(static_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp16"))
    assert "--fp16" in args
    assert "--int8" not in args
    assert not any(a.startswith("--precisionConstraints") for a in args)  # no CumSum in this graph


def test_trtexec_fp16_pins_cumsum_to_fp32(cumsum_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="fp16"))
    assert "--fp16" in args
    assert "--precisionConstraints=obey" in args
    assert f"--layerPrecisions={CUMSUM_NODE}:fp32" in args
    assert f"--layerOutputTypes={CUMSUM_NODE}:fp32" in args


def test_trtexec_fp32_does_not_pin_cumsum(cumsum_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="fp32"))
    assert not any(a.startswith(("--precisionConstraints", "--layerPrecisions")) for a in args)


def test_trtexec_int8_qdq(cumsum_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="int8-qdq"))
    assert "--int8" in args
    assert "--fp16" in args  # layers left unquantized may use FP16
    assert "--precisionConstraints=obey" in args


def test_trtexec_strongly_typed_has_no_precision_flags(cumsum_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="int8-qdq", strongly_typed=True))
    assert "--stronglyTyped" in args
    for flag in ("--int8", "--fp16", "--precisionConstraints=obey"):
        assert flag not in args


def test_trtexec_dla(static_onnx: Path, tmp_path: Path) -> None:
    args = _args(EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp16", dla_core=1))
    assert "--useDLACore=1" in args
    assert "--allowGPUFallback" in args


def test_trtexec_cache_workspace_and_level(static_onnx: Path, tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    spec = EngineSpec(
        static_onnx, tmp_path / "m.engine", workspace_mib=1024, timing_cache=cache, builder_optimization_level=5
    )
    args = _args(spec)
    assert f"--timingCacheFile={cache}" in args
    assert "--memPoolSize=workspace:1024M" in args
    assert "--builderOptimizationLevel=5" in args


def test_trtexec_command_is_shell_quoted(tmp_path: Path) -> None:
    onnx_path = _conv_relu(tmp_path / "my models" / "m.onnx")
    engine = tmp_path / "my models" / "m.engine"
    command = trtexec_command(EngineSpec(onnx_path, engine))
    assert f"--onnx={onnx_path}" in shlex.split(command)
    assert f"--saveEngine={engine}" in shlex.split(command)


# --------------------------------------------------------------------------------------------
# Sidecar and atomic writes
# --------------------------------------------------------------------------------------------


def test_sidecar_contents(static_onnx: Path, tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    engine_hash = hashlib.sha256(engine.read_bytes()).hexdigest()
    spec = EngineSpec(static_onnx, engine, precision="fp16", workspace_mib=2048)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    data = sidecar(spec, engine_hash, "10.3.0", gpu_name="Orin", built_at=when)

    assert data["tensorrt_version"] == "10.3.0"
    assert data["precision"] == "fp16"
    assert data["workspace_mib"] == 2048
    assert data["onnx"]["sha256"] == hashlib.sha256(static_onnx.read_bytes()).hexdigest()
    assert data["engine"]["sha256"] == engine_hash
    assert data["inputs"] == [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert data["outputs"] == [{"name": "output", "shape": [1, 4, 8, 8], "dtype": "float32"}]
    assert data["trtexec_command"] == trtexec_command(spec)
    assert data["gpu"] == "Orin"
    assert datetime.fromisoformat(data["built_at"]) == when

    write_sidecar(spec.sidecar_path, data)
    assert spec.sidecar_path.name == "m.engine.json"
    assert json.loads(spec.sidecar_path.read_text()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json", "static.onnx"]


def test_write_sidecar_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "m.engine.json"
    write_sidecar(path, {"version": 1})
    before = path.read_bytes()

    with pytest.raises(TypeError):
        write_sidecar(path, {"version": 2, "oops": object()})  # json fails part-way through the write

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine.json"]


def test_write_sidecar_is_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_sidecar(path, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------------------------
# build_engine error paths (no TensorRT needed)
# --------------------------------------------------------------------------------------------


def test_build_engine_without_tensorrt_gives_the_trtexec_command(
    static_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    spec = EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp16")

    with pytest.raises(TensorRTUnavailable) as info:
        build_engine(spec)

    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "TensorRT is not installed" in message
    assert trtexec_command(spec) in message
    assert "\n" not in message
    assert not Path(spec.engine_path).exists()
    assert not spec.sidecar_path.exists()


def test_build_engine_missing_onnx(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX model not found: .*missing.onnx"):
        build_engine(EngineSpec(tmp_path / "missing.onnx", tmp_path / "m.engine"))


def test_build_engine_missing_output_dir_fails_before_any_work(
    static_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # would raise TensorRTUnavailable if reached
    spec = EngineSpec(static_onnx, tmp_path / "no" / "such" / "dir" / "m.engine")
    with pytest.raises(FileNotFoundError, match="output directory for the engine does not exist"):
        build_engine(spec)
    assert not (tmp_path / "no").exists()


def test_build_engine_missing_timing_cache_dir(static_onnx: Path, tmp_path: Path) -> None:
    spec = EngineSpec(static_onnx, tmp_path / "m.engine", timing_cache=tmp_path / "nope" / "t.cache")
    with pytest.raises(FileNotFoundError, match="output directory for the timing cache does not exist"):
        build_engine(spec)


# --------------------------------------------------------------------------------------------
# build_engine against a fake `tensorrt` module: checks what we ask of TensorRT, not TensorRT
# --------------------------------------------------------------------------------------------


class _FakeLayer:
    def __init__(self, name: str, layer_type: object, output_dtypes: list[str]) -> None:
        self.name, self.type = name, layer_type
        self._outputs = [types.SimpleNamespace(dtype=d) for d in output_dtypes]
        self.precision: str | None = None
        self.output_types: dict[int, str] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, i: int) -> types.SimpleNamespace:
        return self._outputs[i]

    def set_output_type(self, i: int, dtype: str) -> None:
        self.output_types[i] = dtype


def _fake_tensorrt(*, version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True, dla_cores: int = 0):
    """A stand-in for the TensorRT 10 (or, with version 11.x, 11) Python API surface build_engine uses."""
    weak = version.startswith("10.")
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.float32, trt.float16, trt.int32 = "float32", "float16", "int32"
    severity = enum.Enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
    trt.ILogger = type("ILogger", (), {"Severity": severity, "__init__": lambda self: None})
    weak_flags = ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] if weak else []
    trt.BuilderFlag = enum.Enum("BuilderFlag", ["GPU_FALLBACK", *weak_flags])
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.LayerType = enum.Enum("LayerType", ["CONVOLUTION", "CUMULATIVE"])
    trt.DeviceType = enum.Enum("DeviceType", ["GPU", "DLA"])
    state = types.SimpleNamespace(plugins=0, network_flags=None, flags=set(), pools={}, profiles=[], caches=[])
    trt.state = state
    layers = [
        _FakeLayer("conv", trt.LayerType.CONVOLUTION, ["float32"]),
        _FakeLayer(CUMSUM_NODE, trt.LayerType.CUMULATIVE, ["float32"]),
    ]
    state.layers = layers

    def init_plugins(logger: object, namespace: str) -> bool:
        state.plugins += 1
        return True

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network: object, logger: object) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return parse_ok

        def get_error(self, i: int) -> str:
            return f"In node {i} (ScatterElements):\n  UNSUPPORTED_NODE: error {i}"

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        builder_optimization_level = None
        default_device_type = None
        DLA_core = None

        def set_memory_pool_limit(self, pool: object, size: int) -> None:
            state.pools[pool] = size

        def set_flag(self, flag: object) -> None:
            state.flags.add(flag.name)

        def create_timing_cache(self, data: bytes) -> types.SimpleNamespace:
            state.caches.append(bytes(data))
            return types.SimpleNamespace(serialize=lambda: b"CACHE")

        def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
            self._cache = cache
            return True

        def get_timing_cache(self) -> object:
            return self._cache

        def add_optimization_profile(self, profile: Profile) -> int:
            state.profiles.append(profile.shapes)
            return 0

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger: object) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> types.SimpleNamespace:
            state.network_flags = flags
            inputs = [types.SimpleNamespace(name="input")]
            return types.SimpleNamespace(
                num_layers=len(layers),
                get_layer=layers.__getitem__,
                num_inputs=1,
                get_input=inputs.__getitem__,
            )

        def create_builder_config(self) -> Config:
            state.config = Config()
            return state.config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: object, config: Config) -> bytes | None:
            if build_ok:
                return b"ENGINE"
            self.logger.log(severity.ERROR, "out of\nmemory")
            return None

    trt.init_libnvinfer_plugins = init_plugins
    trt.OnnxParser, trt.Builder = Parser, Builder
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    def install(**kwargs):
        trt = _fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    return install


def test_fake_build_fp16_pins_cumsum_and_writes_files(fake_trt, cumsum_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt()
    cache = tmp_path / "timing.cache"
    spec = EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="fp16", timing_cache=cache)

    engine = build_engine(spec)

    state = trt.state
    assert state.plugins == 1
    assert state.network_flags == 0
    assert state.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    assert state.pools == {trt.MemoryPoolType.WORKSPACE: 4096 << 20}
    assert state.config.builder_optimization_level == 3
    assert state.profiles == []  # static network: no profile
    conv, cumsum = state.layers
    assert (cumsum.precision, cumsum.output_types) == ("float32", {0: "float32"})
    assert (conv.precision, conv.output_types) == (None, {})
    assert engine.read_bytes() == b"ENGINE"
    assert state.caches == [b""] and cache.read_bytes() == b"CACHE"
    record = json.loads(spec.sidecar_path.read_text())
    assert record["engine"]["sha256"] == hashlib.sha256(b"ENGINE").hexdigest()
    assert record["tensorrt_version"] == "10.3.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cumsum.onnx", "m.engine", "m.engine.json", "timing.cache"]


def test_fake_build_reuses_timing_cache(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    build_engine(EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp32", timing_cache=cache))
    assert trt.state.caches == [b"OLD"]
    assert trt.state.flags == set()


def test_fake_build_int8_qdq_flags(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt()
    build_engine(EngineSpec(static_onnx, tmp_path / "m.engine", precision="int8-qdq"))
    assert {"FP16", "INT8"} <= trt.state.flags


def test_fake_build_strongly_typed_sets_no_precision(fake_trt, cumsum_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt(version="11.4.0")
    build_engine(EngineSpec(cumsum_onnx, tmp_path / "m.engine", precision="fp16", strongly_typed=True))
    assert trt.state.network_flags == 1 << 1
    assert trt.state.flags == set()
    assert trt.state.layers[1].precision is None


def test_fake_build_weak_fp16_on_tensorrt_11_is_refused(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    fake_trt(version="11.4.0")
    with pytest.raises(EngineBuildError, match="no weak typing.*strongly_typed=True"):
        build_engine(EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp16"))


def test_fake_build_reports_every_parser_error(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    fake_trt(parse_ok=False)
    with pytest.raises(EngineBuildError) as info:
        build_engine(EngineSpec(static_onnx, tmp_path / "m.engine"))
    message = str(info.value)
    assert "could not parse" in message and "error 0" in message and "error 1" in message
    assert "\n" not in message


def test_fake_build_failure_writes_nothing(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    fake_trt(build_ok=False)
    with pytest.raises(EngineBuildError, match="failed to build .*out of memory"):
        build_engine(EngineSpec(static_onnx, tmp_path / "m.engine"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.onnx"]


def test_fake_build_profile_for_pinned_dynamic_input(fake_trt, dynamic_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt()
    spec = EngineSpec(dynamic_onnx, tmp_path / "m.engine", precision="fp32", input_shapes={"input": (2, 3, 8, 8)})
    build_engine(spec)
    assert trt.state.profiles == [{"input": ((2, 3, 8, 8),) * 3}]


def test_fake_build_dla(fake_trt, static_onnx: Path, tmp_path: Path) -> None:
    trt = fake_trt(dla_cores=2)
    build_engine(EngineSpec(static_onnx, tmp_path / "m.engine", precision="fp16", dla_core=1))
    config = trt.state.config
    assert (config.default_device_type, config.DLA_core) == (trt.DeviceType.DLA, 1)
    assert "GPU_FALLBACK" in trt.state.flags

    fake_trt(dla_cores=0)
    with pytest.raises(EngineBuildError, match="DLA core 1 requested but this device has 0"):
        build_engine(EngineSpec(static_onnx, tmp_path / "m2.engine", precision="fp16", dla_core=1))


# --------------------------------------------------------------------------------------------
# runtime.py and parity.py helpers (no GPU needed)
# --------------------------------------------------------------------------------------------


def test_runtime_and_parity_import_neither_torch_nor_onnx() -> None:
    code = (
        "import sys, export.runtime, export.parity\n"
        "bad = sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_engine_builder_does_not_import_torch() -> None:
    """Deployment images carry TensorRT and onnx but not torch; the shared atomic writer is torch-free."""
    code = "import sys, export.tensorrt\nassert 'torch' not in sys.modules\n"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _specs() -> dict[str, TensorSpec]:
    return {"images": TensorSpec("images", (1, 3), np.dtype(np.float32))}


def test_check_inputs_accepts_exact_match() -> None:
    check_inputs(_specs(), {"images": np.zeros((1, 3), np.float32)})


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, r"missing input tensor\(s\) \['images'\]"),
        (
            {"images": np.zeros((1, 3), np.float32), "points": np.zeros(1)},
            r"unknown input tensor\(s\) \['points'\]",
        ),
        ({"images": np.zeros((1, 4), np.float32)}, r"input 'images': expected shape \(1, 3\), got \(1, 4\)"),
        ({"images": np.zeros((1, 3), np.float64)}, "input 'images': expected dtype float32, got float64"),
        ({"images": [[0.0, 0.0, 0.0]]}, "input 'images': expected a numpy array, got list"),
    ],
)
def test_check_inputs_errors_name_the_tensor(inputs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_inputs(_specs(), inputs)


def test_tensor_spec_nbytes() -> None:
    assert TensorSpec("x", (2, 3, 4), np.dtype(np.float16)).nbytes == 48


def test_latency_summary() -> None:
    stats = latency_summary([float(v) for v in range(1, 101)])
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == pytest.approx(50.5)
    assert (stats["min"], stats["max"]) == (1.0, 100.0)
    with pytest.raises(ValueError, match="no latency samples"):
        latency_summary([])


def test_compare_outputs_numbers() -> None:
    reference = {"boxes": np.zeros(4, np.float32), "heatmap": np.ones((2, 2), np.float32)}
    candidate = {
        "boxes": np.array([0.0, 1e-5, 0.0, -3e-5], np.float32),
        "heatmap": np.array([[1.0, 1.0], [1.0, 1.002]], np.float32),
    }
    fp32 = compare_outputs(reference, candidate)
    boxes, heatmap = fp32.outputs["boxes"], fp32.outputs["heatmap"]
    assert boxes.max_abs == pytest.approx(3e-5, rel=1e-3)
    assert boxes.mean_abs == pytest.approx(1e-5, rel=1e-3)
    assert boxes.ok
    assert heatmap.max_abs == pytest.approx(2e-3, rel=1e-3)
    assert heatmap.mean_abs == pytest.approx(5e-4, rel=1e-3)
    assert heatmap.max_ref_abs == 1.0
    assert not heatmap.ok
    assert not fp32.ok
    assert "FAILED" in str(fp32)

    fp16 = compare_outputs(reference, candidate, precision="fp16")
    assert fp16.ok
    assert fp16.outputs["heatmap"].atol == 1e-2
    assert json.loads(json.dumps(fp16.to_dict()))["ok"] is True


def test_compare_outputs_nonfinite() -> None:
    reference = {"x": np.array([0.0, np.nan, np.inf], np.float32)}
    assert compare_outputs(reference, {"x": np.array([0.0, np.nan, np.inf], np.float32)}).ok
    bad = compare_outputs(reference, {"x": np.array([np.nan, np.nan, 1.0], np.float32)})
    assert bad.outputs["x"].nonfinite == 2
    assert not bad.ok


@pytest.mark.parametrize(
    "candidate, kwargs, message",
    [
        ({"y": np.zeros(2)}, {}, r"missing from candidate \['x'\], not in reference \['y'\]"),
        ({"x": np.zeros(3)}, {}, r"output 'x': reference shape \(2,\) vs candidate shape \(3,\)"),
        ({"x": np.zeros(2)}, {"precision": "int4"}, "precision must be one of"),
    ],
)
def test_compare_outputs_rejects(candidate: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compare_outputs({"x": np.zeros(2)}, candidate, **kwargs)


def _cudart_or_skip():
    try:
        return import_cudart()
    except CudaUnavailable as exc:
        pytest.skip(f"cuda-python not installed: {exc}")


def test_cuda_call_names_the_failing_call() -> None:
    cudart = _cudart_or_skip()

    def cudaFakeCall():  # noqa: N802 - named like the CUDA calls it stands in for
        return (cudart.cudaError_t.cudaErrorInvalidValue, None)

    def cudaFakeOk():  # noqa: N802
        return (cudart.cudaError_t.cudaSuccess, 7)

    with pytest.raises(CudaError, match="cudaFakeCall failed: cudaErrorInvalidValue"):
        cuda_call(cudaFakeCall)
    assert cuda_call(cudaFakeOk) == 7


# --------------------------------------------------------------------------------------------
# GPU tests: cuda-python alone, then TensorRT
# --------------------------------------------------------------------------------------------


def _skip_without_gpu() -> None:
    try:
        count = cuda_device_count()
    except CudaUnavailable as exc:
        pytest.skip(f"cuda-python not installed, cannot look for a GPU: {exc}")
    if count == 0:
        pytest.skip("no CUDA device: cudaGetDeviceCount reports none (or there is no NVIDIA driver)")


def test_device_buffer_roundtrip() -> None:
    _skip_without_gpu()
    from export.runtime import CudaStream

    host = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    with CudaStream() as stream, DeviceBuffer.from_host(host, stream) as buffer:
        back = buffer.to_host(host.shape, host.dtype, stream)
        stream.synchronize()
        np.testing.assert_array_equal(back, host)
        np.testing.assert_array_equal(buffer.to_host(host.shape, host.dtype), host)  # blocking copy
        with pytest.raises(ValueError, match="does not fit"):
            buffer.copy_from_host(np.zeros(100, np.float32))


def _onnxruntime_reference(onnx_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _tensorrt_or_skip():
    trt = pytest.importorskip("tensorrt", reason="TensorRT Python bindings not installed")
    _skip_without_gpu()
    return trt


@pytest.mark.parametrize(
    "precision, strongly_typed",
    [("fp32", False), ("fp16", False), ("fp16", True)],
    ids=["fp32", "fp16-weak", "fp16-strong"],
)
def test_engine_matches_onnxruntime(tmp_path: Path, precision: str, strongly_typed: bool) -> None:
    trt = _tensorrt_or_skip()
    if precision != "fp32" and not strongly_typed and not hasattr(trt.BuilderFlag, "FP16"):
        pytest.skip(f"TensorRT {trt.__version__} has no weak typing (removed in 11): FP16 comes from the graph")
    from export.runtime import TensorRTRunner

    reference_onnx = _conv_relu(tmp_path / "ref.onnx", cumsum=True)
    onnx_path = _conv_relu(tmp_path / "m.onnx", cumsum=True, fp16_graph=strongly_typed)
    spec = EngineSpec(
        onnx_path,
        tmp_path / f"m_{precision}.engine",
        precision=precision,
        strongly_typed=strongly_typed,
        workspace_mib=256,
        timing_cache=tmp_path / "timing.cache",
    )
    engine_path = build_engine(spec)

    assert engine_path.is_file() and (tmp_path / "timing.cache").is_file()
    record = json.loads(spec.sidecar_path.read_text())
    assert record["engine"]["sha256"] == hashlib.sha256(engine_path.read_bytes()).hexdigest()
    assert record["tensorrt_version"] == trt.__version__

    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    with TensorRTRunner(engine_path) as runner:
        outputs = runner.run(feeds)
        timing = runner.time(feeds, warmup=2, runs=5)
    report = compare_outputs(_onnxruntime_reference(reference_onnx, feeds), outputs, precision=precision)
    assert report.ok, str(report)
    assert timing["execute_ms"]["median"] > 0
    assert timing["end_to_end_ms"]["median"] >= timing["execute_ms"]["min"]


def test_engine_from_dynamic_onnx_with_pinned_shape(tmp_path: Path) -> None:
    _tensorrt_or_skip()
    from export.runtime import TensorRTRunner

    onnx_path = _conv_relu(tmp_path / "m.onnx", batch="batch")
    spec = EngineSpec(onnx_path, tmp_path / "m.engine", precision="fp32", input_shapes={"input": (2, 3, 8, 8)})
    feeds = {"input": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    with TensorRTRunner(build_engine(spec)) as runner:
        assert runner.inputs["input"].shape == (2, 3, 8, 8)
        assert runner.outputs["output"].shape == (2, 4, 8, 8)
        outputs = runner.run(feeds)
    assert compare_outputs(_onnxruntime_reference(onnx_path, feeds), outputs).ok


def test_stream_and_event_free_their_handle_once_on_exit(monkeypatch) -> None:
    """The context-manager lifecycle shared by the CUDA resources, on a fake cuda-python runtime."""
    import types

    from export import runtime

    destroyed: list[tuple[str, int]] = []
    fake = types.SimpleNamespace(
        cudaError_t=types.SimpleNamespace(cudaSuccess=0),
        cudaStreamCreate=lambda: (0, 7),
        cudaStreamDestroy=lambda h: (destroyed.append(("stream", h)), 0)[1:],
        cudaEventCreate=lambda: (0, 9),
        cudaEventDestroy=lambda h: (destroyed.append(("event", h)), 0)[1:],
    )
    monkeypatch.setattr(runtime, "import_cudart", lambda: fake)
    with runtime.CudaStream() as stream, runtime.CudaEvent() as event:
        assert stream.ptr == 7 and isinstance(event, runtime.CudaEvent)
    assert destroyed == [("event", 9), ("stream", 7)]
    stream.close()
    event.close()
    assert len(destroyed) == 2
    with pytest.raises(RuntimeError, match="closed"):
        _ = stream.handle
