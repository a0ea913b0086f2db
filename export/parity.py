"""Numerical parity between two runs of the same model (e.g. TensorRT vs ONNX Runtime), numpy only.

Why: an engine that builds is not an engine that is right. Every export is checked against a
reference run on the same inputs, output by output, by name (a model's nested outputs arrive here
flattened by `export.onnx`, one named tensor each, e.g. `boxes.0`). The tolerance follows the
precision the candidate was built for, because FP16 and INT8 engines are expected to differ from an
FP32 reference; what matters is that the error is small and, above all, finite. This module imports
only numpy so it runs both on a workstation and in the Jetson deployment image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2, "int8-qdq": 1e-1}


@dataclass(frozen=True)
class OutputParity:
    """Absolute error of one output tensor, candidate against reference."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_ref_abs: float  # scale of the reference, to read max_abs against
    nonfinite: int  # elements where exactly one side is NaN/Inf, or both are but differently
    atol: float

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.max_abs <= self.atol


@dataclass(frozen=True)
class ParityReport:
    """Per-output errors; `ok` only if every output is within its tolerance."""

    precision: str
    outputs: dict[str, OutputParity]

    @property
    def ok(self) -> bool:
        return all(out.ok for out in self.outputs.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "precision": self.precision,
            "ok": self.ok,
            "outputs": {name: {**asdict(out), "ok": out.ok} for name, out in self.outputs.items()},
        }

    def __str__(self) -> str:
        lines = [f"parity ({self.precision}): {'OK' if self.ok else 'FAILED'}"]
        width = max([24, *(len(name) for name in self.outputs)])  # flattened nested names can be long
        for out in self.outputs.values():
            lines.append(
                f"  {out.name:<{width}} max_abs={out.max_abs:.3e} mean_abs={out.mean_abs:.3e} "
                f"|ref|max={out.max_ref_abs:.3e} nonfinite={out.nonfinite} atol={out.atol:.0e} "
                f"{'ok' if out.ok else 'FAIL'}"
            )
        return "\n".join(lines)


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    precision: str = "fp32",
    atol_fp32: float = DEFAULT_ATOL["fp32"],
    atol_fp16: float = DEFAULT_ATOL["fp16"],
    atol_int8: float = DEFAULT_ATOL["int8-qdq"],
) -> ParityReport:
    """Max / mean absolute error of every output, judged against the tolerance for `precision`.

    Both sides must have the same output names and shapes (a `ValueError` says which differs).
    Errors are computed in float64 so that comparing two FP16 arrays does not round the error.
    """
    atols = {"fp32": atol_fp32, "fp16": atol_fp16, "int8-qdq": atol_int8}
    if precision not in atols:
        raise ValueError(f"precision must be one of {sorted(atols)}, got '{precision}'")
    if set(reference) != set(candidate):
        missing = sorted(set(reference) - set(candidate))
        extra = sorted(set(candidate) - set(reference))
        raise ValueError(f"output names differ: missing from candidate {missing}, not in reference {extra}")
    outputs = {
        name: _compare_one(name, np.asarray(reference[name]), np.asarray(candidate[name]), atols[precision])
        for name in reference
    }
    return ParityReport(precision, outputs)


def _compare_one(name: str, ref: np.ndarray, cand: np.ndarray, atol: float) -> OutputParity:
    if ref.shape != cand.shape:
        raise ValueError(f"output '{name}': reference shape {ref.shape} vs candidate shape {cand.shape}")
    ref64 = ref.astype(np.float64)
    cand64 = cand.astype(np.float64)
    finite = np.isfinite(ref64) & np.isfinite(cand64)
    # Non-finite values must agree exactly (same NaN/Inf pattern); anywhere else they are an error.
    same_nonfinite = ~finite & ((ref64 == cand64) | (np.isnan(ref64) & np.isnan(cand64)))
    nonfinite = int(np.count_nonzero(~finite & ~same_nonfinite))
    diff = np.abs(ref64[finite] - cand64[finite])
    return OutputParity(
        name=name,
        shape=tuple(ref.shape),
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        max_ref_abs=float(np.abs(ref64[finite]).max()) if diff.size else 0.0,
        nonfinite=nonfinite,
        atol=float(atol),
    )
