"""TensorRT engines for an exported model directory (`altermoma export trt`).

Takes what `altermoma export onnx` wrote (model.onnx and split/*.onnx), writes `build_engines.sh`
(the equivalent trtexec command of every engine, for building on the Jetson itself, since engines
are not portable across GPUs or TensorRT versions), then, where TensorRT imports, builds every engine
and checks it against ONNX Runtime on the same inputs. Where TensorRT is missing it says so and
stops: no code path here claims a TensorRT result it did not produce.

A graph with QuantizeLinear/DequantizeLinear nodes (`altermoma quantize --onnx`) gets INT8 engines whatever
precisions were asked for: TensorRT 10 builds it weakly typed with `--int8 --fp16` (INT8 where the Q/DQ
nodes say, FP16 allowed elsewhere), TensorRT 11 (weak typing removed) strongly typed with `--stronglyTyped`
(INT8 where the Q/DQ nodes say, the graph's FP32 elsewhere). The script holds both and picks by
`$TRT_MAJOR` (default: read from `trtexec --version`); a build here uses the installed TensorRT's form.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common.io import verify_manifest
from export.parity import compare_outputs
from export.runtime import TensorRTUnavailable, import_tensorrt
from export.tensorrt import EngineSpec, build_engine, read_onnx_io, trtexec_command

PRECISIONS = ("fp32", "fp16")


def exported_graphs(onnx_dir: str | Path) -> dict[str, Path]:
    """The single graph and the split stages found in an `export onnx` output directory, checked
    against its manifest (a folder mixing two exports is refused)."""
    onnx_dir = Path(onnx_dir)
    model = onnx_dir / "model.onnx"
    if not model.is_file():
        raise FileNotFoundError(f"no model.onnx in {onnx_dir}: run `altermoma export onnx` first")
    verify_manifest(onnx_dir)
    return {"model": model, **{p.stem: p for p in sorted((onnx_dir / "split").glob("*.onnx"))}}


def has_qdq(onnx_path: str | Path) -> bool:
    """Whether a graph is explicitly quantized (holds QuantizeLinear / DequantizeLinear nodes)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


def engine_specs(
    graphs: dict[str, Path], out_dir: Path, precisions: tuple[str, ...], workspace_mib: int
) -> list[EngineSpec]:
    """One engine per graph and precision; a Q/DQ graph gets its two INT8 forms instead (see the docstring)."""
    qdq = {name for name, path in graphs.items() if has_qdq(path)}
    common = {"workspace_mib": workspace_mib, "timing_cache": out_dir / "timing.cache"}
    specs = [
        EngineSpec(path, out_dir / f"{name}-{precision}.engine", precision=precision, **common)
        for precision in precisions
        for name, path in graphs.items()
        if name not in qdq
    ]
    for name in qdq:
        for typed in (False, True):
            suffix = "int8-qdq-typed" if typed else "int8-qdq"
            engine = out_dir / f"{name}-{suffix}.engine"
            specs.append(EngineSpec(graphs[name], engine, precision="int8-qdq", strongly_typed=typed, **common))
    return specs


def _int8_form_matches(spec: EngineSpec, weak_typing: bool) -> bool:
    """Which INT8 form the installed TensorRT builds: weakly typed on 10, strongly typed on 11."""
    return spec.precision != "int8-qdq" or spec.strongly_typed != weak_typing


def write_build_script(specs: list[EngineSpec], path: Path) -> None:
    """trtexec lines with paths relative to the script, so the ONNX and engine folders can be copied to a Jetson."""
    from common.io import atomic_write_text

    here = path.parent
    lines = [
        "#!/usr/bin/env bash",
        "# Build every engine on the target device. trtexec: $TRTEXEC if set, else the one on PATH, else",
        "# JetPack's /usr/src/tensorrt/bin/trtexec (not on a Jetson's PATH by default).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
    ]
    if any(spec.precision == "int8-qdq" for spec in specs):
        lines += [
            "# INT8 (Q/DQ graphs): TensorRT 10 builds weakly typed (--int8 --fp16), TensorRT 11 strongly typed.",
            'TRT_MAJOR="${TRT_MAJOR:-$("$TRTEXEC" --version 2>/dev/null | grep -o "TensorRT v[0-9]*" | grep -o "[0-9]*$" '
            '| head -c 2 || echo 10)}"',
            'TRT_MAJOR="${TRT_MAJOR:-10}"',
        ]
    for spec in specs:
        command = trtexec_command(spec)
        if command.startswith("trtexec "):
            command = '"$TRTEXEC" ' + command[len("trtexec ") :]
        paths = [
            (spec.onnx_path, os.path.relpath(spec.onnx_path, here)),
            (spec.engine_path, Path(spec.engine_path).name),
        ]
        if spec.timing_cache:
            paths.append((spec.timing_cache, Path(spec.timing_cache).name))
        for absolute, relative in paths:
            command = command.replace(str(absolute), relative)
        if spec.precision == "int8-qdq":
            test = "-ge 11" if spec.strongly_typed else "-lt 11"
            command = f'if [ "${{TRT_MAJOR:0:2}}" {test} ]; then {command}; fi'
        lines.append(command)
    atomic_write_text(path, "\n".join(lines) + "\n")
    path.chmod(0o755)


def sample_inputs(onnx_path: Path, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the graph's shapes: floats in [0, 1), integer indices 0 (valid for every gather)."""
    rng = np.random.default_rng(seed)
    inputs, _ = read_onnx_io(onnx_path)
    return {
        name: rng.random(shape).astype(dtype) if np.issubdtype(np.dtype(dtype), np.floating) else np.zeros(shape, dtype)
        for name, (shape, dtype) in inputs.items()
    }


def check_against_onnxruntime(spec: EngineSpec, samples: int, threads: int) -> dict:
    from export.onnx import ort_session
    from export.runtime import TensorRTRunner

    session = ort_session(spec.onnx_path, threads)
    names = [o.name for o in session.get_outputs()]
    reports = []
    with TensorRTRunner(spec.engine_path) as runner:
        for seed in range(samples):
            feeds = sample_inputs(Path(spec.onnx_path), seed)
            reference = dict(zip(names, session.run(names, feeds)))
            reports.append(compare_outputs(reference, runner.run(feeds), precision=spec.precision).to_dict())
    return {"ok": all(r["ok"] for r in reports), "samples": reports}


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    precisions: tuple[str, ...] = ("fp16",),
    workspace_mib: int = 4096,
    samples: int = 2,
    threads: int = 1,
) -> dict:
    """Write build_engines.sh, then build and check every engine where TensorRT exists.

    Without TensorRT only the script is written and the report says so ("built": False): the engines
    are meant to be built on the target device anyway, so that is not an error.
    """
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {unknown[0]!r}")
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_dir.parent} does not exist")
    graphs = exported_graphs(onnx_dir)
    out_dir.mkdir(exist_ok=True)
    specs = engine_specs(graphs, out_dir, precisions, workspace_mib)
    script = out_dir / "build_engines.sh"
    write_build_script(specs, script)
    try:
        import_tensorrt()
    except TensorRTUnavailable as error:
        return {"built": False, "reason": str(error), "script": str(script), "engines": {}, "ok": None}
    from export.tensorrt import _supports_weak_typing

    weak_typing = _supports_weak_typing(import_tensorrt())
    report = {"built": True, "script": str(script), "engines": {}}
    for spec in [s for s in specs if _int8_form_matches(s, weak_typing)]:
        build_engine(spec)
        report["engines"][Path(spec.engine_path).name] = check_against_onnxruntime(spec, samples, threads)
    report["ok"] = all(e["ok"] for e in report["engines"].values())
    from common.io import atomic_write_text

    atomic_write_text(out_dir / "trt_report.json", json.dumps(report, indent=2))
    return report
