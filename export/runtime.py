"""Run a serialized TensorRT engine from Python with nothing but tensorrt, cuda-python and numpy.

Why this module exists: the deployment image on a Jetson has TensorRT, cuda-python and numpy and
nothing else (no torch, no onnx, no pycuda, which no longer builds against current CUDA), so this
file imports only those, and imports tensorrt/cuda-python lazily: the pure-numpy helpers here
(input checks, latency summaries) stay importable and testable on a machine without a GPU.

The layering follows NVIDIA's current Python samples (`samples/python/common_runtime.py`, which
moved from pycuda to cuda-python in TensorRT 10.x): every CUDA runtime call returns an
`(error, *values)` tuple and goes through `cuda_call`, which raises with the call's name. Tensors
are addressed by name (`set_tensor_address` + `execute_async_v3`), never by binding index.

`DeviceBuffer`, `CudaStream` and `CudaEvent` need cuda-python only, so a GPU smoke test can check
them without TensorRT. Host arrays are ordinary (pageable) numpy arrays: `cudaMemcpyAsync` from
pageable memory is staged by the driver and is not truly asynchronous, which is fine for
validation and latency measurement of the engine itself; pinned buffers are an optimisation for
a production pipeline, not needed here.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np


class TensorRTUnavailable(RuntimeError):
    """The TensorRT Python bindings cannot be imported on this machine."""


class CudaUnavailable(RuntimeError):
    """cuda-python (the `cuda-bindings` package) cannot be imported on this machine."""


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error code."""


# --------------------------------------------------------------------------------------------
# Lazy imports
# --------------------------------------------------------------------------------------------


def import_cudart() -> ModuleType:
    """Return the CUDA runtime bindings of cuda-python, whichever layout the installed version uses.

    cuda-python >= 12.6 ships `cuda.bindings.runtime`; older releases only have `cuda.cudart`, which
    13.x removed. Raises `CudaUnavailable` when neither is importable.
    """
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise CudaUnavailable(
                f"cuda-python is not installed ({exc}); install 'cuda-python' matching the CUDA major version"
            ) from exc
    return cudart


def import_tensorrt() -> ModuleType:
    """Return the `tensorrt` module, or raise `TensorRTUnavailable` with a one-line reason."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: bindings present but libnvinfer missing
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc})") from exc
    return trt


# --------------------------------------------------------------------------------------------
# CUDA runtime helpers (cuda-python only, no TensorRT)
# --------------------------------------------------------------------------------------------


def cuda_call(fn: Callable[..., tuple[Any, ...]], *args: Any) -> Any:
    """Call a cuda-python runtime function and raise `CudaError` naming it if it failed.

    cuda-python returns `(cudaError_t, *results)`. Returns None, the single result, or a tuple.
    """
    cudart = import_cudart()
    err, *results = fn(*args)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(fn, "__name__", repr(fn))
        raise CudaError(f"{name} failed: {_error_name(cudart, err)}")
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


def _error_name(cudart: ModuleType, err: Any) -> str:
    try:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        return f"{name.decode()} ({text.decode()})"
    except Exception:  # the error lookup itself must never hide the original failure
        return repr(err)


def cuda_device_count() -> int:
    """Number of visible CUDA devices; 0 when there is no driver or no device (never raises CUDA errors)."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def cuda_device_name(device: int = 0) -> str:
    """Marketing name of a CUDA device, e.g. 'Orin' or 'NVIDIA H100 80GB HBM3'."""
    cudart = import_cudart()
    props = cuda_call(cudart.cudaGetDeviceProperties, device)
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name)


_Owned = TypeVar("_Owned", bound="_OwnedCudaResource")


class _OwnedCudaResource(abc.ABC):
    """A stream, event or buffer we allocated: a context manager whose exit frees it.

    `close()` is the contract and must be safe to call twice; `__del__` is only a fallback.
    """

    @abc.abstractmethod
    def close(self) -> None:
        """Free the resource; a second call does nothing."""

    def __enter__(self: _Owned) -> _Owned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class CudaStream(_OwnedCudaResource):
    """An owned CUDA stream. Use as a context manager or call `close()`."""

    def __init__(self) -> None:
        self._cudart = import_cudart()
        self._stream: Any = cuda_call(self._cudart.cudaStreamCreate)

    @property
    def handle(self) -> Any:
        if self._stream is None:
            raise RuntimeError("CUDA stream is closed")
        return self._stream

    @property
    def ptr(self) -> int:
        """The raw `cudaStream_t` value, as TensorRT's `execute_async_v3` expects it."""
        return int(self.handle)

    def synchronize(self) -> None:
        cuda_call(self._cudart.cudaStreamSynchronize, self.handle)

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            cuda_call(self._cudart.cudaStreamDestroy, stream)


class CudaEvent(_OwnedCudaResource):
    """An owned CUDA event, for GPU-side timing of work on a stream."""

    def __init__(self) -> None:
        self._cudart = import_cudart()
        self._event: Any = cuda_call(self._cudart.cudaEventCreate)

    def record(self, stream: CudaStream) -> None:
        cuda_call(self._cudart.cudaEventRecord, self._event, stream.handle)

    def synchronize(self) -> None:
        cuda_call(self._cudart.cudaEventSynchronize, self._event)

    def elapsed_ms_since(self, start: CudaEvent) -> float:
        """Milliseconds between `start` and this event (both must have completed)."""
        return float(cuda_call(self._cudart.cudaEventElapsedTime, start._event, self._event))

    def close(self) -> None:
        if self._event is not None:
            event, self._event = self._event, None
            cuda_call(self._cudart.cudaEventDestroy, event)


class DeviceBuffer(_OwnedCudaResource):
    """A block of device memory (`cudaMalloc`) with host copies in and out.

    With a stream the copies are `cudaMemcpyAsync` on that stream and the caller synchronizes
    before reading results or releasing the host array; without one they are blocking `cudaMemcpy`.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"buffer size must be >= 0 bytes, got {nbytes}")
        self._cudart = import_cudart()
        self.nbytes = int(nbytes)
        # TensorRT wants a valid address even for an empty tensor, so never allocate 0 bytes.
        self._ptr: int | None = int(cuda_call(self._cudart.cudaMalloc, max(self.nbytes, 1)))

    @classmethod
    def from_host(cls, array: np.ndarray, stream: CudaStream | None = None) -> DeviceBuffer:
        """Allocate a buffer of exactly `array.nbytes` and copy `array` into it."""
        array = np.ascontiguousarray(array)
        buffer = cls(array.nbytes)
        try:
            buffer.copy_from_host(array, stream)
        except Exception:
            buffer.close()
            raise
        return buffer

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise RuntimeError("device buffer is freed")
        return self._ptr

    def copy_from_host(self, array: np.ndarray, stream: CudaStream | None = None) -> None:
        if not array.flags.c_contiguous:
            raise ValueError("host array must be C-contiguous (use np.ascontiguousarray)")
        self._check_fits(array.nbytes)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(self.ptr, array.ctypes.data, array.nbytes, kind, stream)

    def copy_to_host(self, out: np.ndarray, stream: CudaStream | None = None) -> np.ndarray:
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("destination array must be C-contiguous and writeable")
        self._check_fits(out.nbytes)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._copy(out.ctypes.data, self.ptr, out.nbytes, kind, stream)
        return out

    def to_host(self, shape: Sequence[int], dtype: np.dtype | type, stream: CudaStream | None = None) -> np.ndarray:
        """Copy the buffer into a new array; with a stream, synchronize it before using the result."""
        return self.copy_to_host(np.empty(tuple(shape), dtype=dtype), stream)

    def _check_fits(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            raise ValueError(f"copy of {nbytes} bytes does not fit a device buffer of {self.nbytes} bytes")

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any, stream: CudaStream | None) -> None:
        if nbytes == 0:
            return
        if stream is None:
            cuda_call(self._cudart.cudaMemcpy, dst, src, nbytes, kind)
        else:
            cuda_call(self._cudart.cudaMemcpyAsync, dst, src, nbytes, kind, stream.handle)

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            cuda_call(self._cudart.cudaFree, ptr)


# --------------------------------------------------------------------------------------------
# Pure-numpy helpers (no GPU needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype of one engine input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def check_inputs(expected: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise `ValueError` (one line, naming the tensor) unless `inputs` match `expected` exactly.

    No implicit casting: a float64 array fed to a float32 engine is a caller bug, not a conversion.
    """
    missing = [name for name in expected if name not in inputs]
    if missing:
        raise ValueError(f"missing input tensor(s) {missing}; the engine expects {list(expected)}")
    unknown = [name for name in inputs if name not in expected]
    if unknown:
        raise ValueError(f"unknown input tensor(s) {unknown}; the engine expects {list(expected)}")
    for name, spec in expected.items():
        array = inputs[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"input '{name}': expected a numpy array, got {type(array).__name__}")
        if tuple(array.shape) != spec.shape:
            raise ValueError(f"input '{name}': expected shape {spec.shape}, got {tuple(array.shape)}")
        if array.dtype != spec.dtype:
            raise ValueError(f"input '{name}': expected dtype {spec.dtype}, got {array.dtype}")


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median / p90 / p99 / mean / min / max of latency samples in milliseconds."""
    samples = np.asarray(samples_ms, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(samples, [50, 90, 99])
    return {
        "median": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(samples.mean()),
        "min": float(samples.min()),
        "max": float(samples.max()),
    }


# --------------------------------------------------------------------------------------------
# TensorRT runner
# --------------------------------------------------------------------------------------------


class TensorRTRunner:
    """Deserialize an engine, own its device buffers and stream, and run it on numpy inputs.

    Engines from `export.tensorrt.build_engine` have static shapes (or a profile with min == max),
    so every buffer is allocated once, up front. Not thread-safe: one runner per thread.

        with TensorRTRunner("bev.engine") as runner:
            outputs = runner.run({"images": images, "points": points})
            stats = runner.time({"images": images, "points": points})
    """

    def __init__(self, engine_path: str | Path, *, plugins: bool = True) -> None:
        self._buffers: dict[str, DeviceBuffer] = {}
        self._stream: CudaStream | None = None
        self._context: Any = None
        self._engine: Any = None
        trt = import_tensorrt()
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        if plugins:
            # Engines holding plugin layers (ScatterElements with reduction) need the registry filled.
            trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(
                f"could not deserialize {engine_path}: engines only load on the GPU model and TensorRT version "
                "that built them (see the TensorRT log above)"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"could not create an execution context for {engine_path}")
        try:
            self.inputs, self.outputs = self._resolve_io(trt)
            self._stream = CudaStream()
            self._allocate()
        except Exception:
            self.close()
            raise

    def _resolve_io(self, trt: ModuleType) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        output_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        inputs = {name: self._input_spec(trt, name) for name in input_names}
        # Output shapes are only known once every input shape is set on the context.
        outputs = {name: self._spec(trt, name, tuple(self._context.get_tensor_shape(name))) for name in output_names}
        for spec in outputs.values():
            if any(d < 0 for d in spec.shape):
                raise RuntimeError(f"output '{spec.name}' has data-dependent shape {spec.shape}; not supported")
        return inputs, outputs

    def _input_spec(self, trt: ModuleType, name: str) -> TensorSpec:
        shape = tuple(self._engine.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            # A dynamic ONNX input built with a fixed profile (min == opt == max): pin it on the context.
            low, opt, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
            if low != high:
                raise RuntimeError(f"input '{name}' has a shape range {low}..{high}; this runner needs static shapes")
            shape = opt
            if not self._context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT rejected shape {shape} for input '{name}'")
        return self._spec(trt, name, shape)

    def _spec(self, trt: ModuleType, name: str, shape: tuple[int, ...]) -> TensorSpec:
        trt_dtype = self._engine.get_tensor_dtype(name)
        try:
            dtype = np.dtype(trt.nptype(trt_dtype))
        except TypeError as exc:  # BF16 / FP8 / INT4 I/O: numpy has no such dtype
            raise RuntimeError(f"tensor '{name}' has TensorRT type {trt_dtype}, which numpy cannot hold") from exc
        return TensorSpec(name, shape, dtype)

    def _allocate(self) -> None:
        for spec in (*self.inputs.values(), *self.outputs.values()):
            buffer = DeviceBuffer(spec.nbytes)
            self._buffers[spec.name] = buffer
            if not self._context.set_tensor_address(spec.name, buffer.ptr):
                raise RuntimeError(f"TensorRT rejected the device address for tensor '{spec.name}'")

    @property
    def stream(self) -> CudaStream:
        if self._stream is None:
            raise RuntimeError("runner is closed")
        return self._stream

    def _upload(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name in self.inputs:
            self._buffers[name].copy_from_host(np.ascontiguousarray(inputs[name]), self.stream)

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _download(self) -> dict[str, np.ndarray]:
        stream = self.stream
        return {name: self._buffers[name].to_host(s.shape, s.dtype, stream) for name, s in self.outputs.items()}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, execute, and return host copies of every output (shape/dtype checked first)."""
        check_inputs(self.inputs, inputs)
        self._upload(inputs)
        self._execute()
        outputs = self._download()
        self.stream.synchronize()
        return outputs

    def time(self, inputs: Mapping[str, np.ndarray], warmup: int = 10, runs: int = 50) -> dict[str, Any]:
        """Latency in ms from CUDA events: `execute_ms` around the engine alone, `end_to_end_ms`
        around host-to-device copies + engine + device-to-host copies. Each holds median/p90/p99/mean/min/max.
        """
        if warmup < 0 or runs < 1:
            raise ValueError(f"need warmup >= 0 and runs >= 1, got warmup={warmup}, runs={runs}")
        check_inputs(self.inputs, inputs)
        for _ in range(warmup):
            self.run(inputs)
        execute_ms: list[float] = []
        end_to_end_ms: list[float] = []
        with CudaEvent() as start, CudaEvent() as exec_start, CudaEvent() as exec_end, CudaEvent() as end:
            for _ in range(runs):
                start.record(self.stream)
                self._upload(inputs)
                exec_start.record(self.stream)
                self._execute()
                exec_end.record(self.stream)
                self._download()
                end.record(self.stream)
                end.synchronize()
                execute_ms.append(exec_end.elapsed_ms_since(exec_start))
                end_to_end_ms.append(end.elapsed_ms_since(start))
        return {
            "warmup": warmup,
            "runs": runs,
            "execute_ms": latency_summary(execute_ms),
            "end_to_end_ms": latency_summary(end_to_end_ms),
        }

    def close(self) -> None:
        """Free device buffers and the stream; safe to call twice."""
        try:
            if self._stream is not None:
                self._stream.synchronize()  # nothing may still be reading or writing the buffers
        finally:
            for buffer in self._buffers.values():
                buffer.close()
            self._buffers.clear()
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            self._context = None  # the context must go before the engine it came from
            self._engine = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
