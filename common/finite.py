"""NaN and Inf: refused in loaded weights, and a training loss that becomes one stops the run cleanly.

A checkpoint with one NaN tensor loads, prunes and exports without complaint and yields a model that
outputs NaN; a diverged fine-tune raises deep inside the loop. Both are user-facing failures with a
known cause, so both are `ValueError`s: the CLI prints them as one `error:` line (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SHOWN = 3  # offending tensors named in a message; the rest are counted


class NonFiniteError(ValueError):
    """Weights that hold NaN or Inf values."""


class NonFiniteLossError(NonFiniteError, FloatingPointError):
    """A training loss (or its gradients) that became NaN or Inf: the run stopped at `step`.

    Also a `FloatingPointError`, what the training loops raised before, so existing handlers still match."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, non-finite values, values) of every floating-point tensor holding NaN or Inf, in order."""
    found = []
    for name, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue  # integer buffers (BatchNorm's step count) cannot hold NaN
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            found.append((name, bad, tensor.numel()))
    return found


def describe(found: list[tuple[str, int, int]], shown: int = SHOWN) -> str:
    """'a.weight (3 of 64 values), b.bias (1 of 8 values) and 2 more tensors'."""
    parts = [f"{name} ({bad} of {total} values)" for name, bad, total in found[:shown]]
    more = len(found) - shown
    return ", ".join(parts) + (f" and {more} more tensor{'s' if more > 1 else ''}" if more > 0 else "")


def check_finite(state: Mapping[str, torch.Tensor], source: str, error: type[NonFiniteError] = NonFiniteError) -> None:
    """Raise `error` naming the first offending tensors if any tensor of `state` holds NaN or Inf."""
    found = non_finite_tensors(state)
    if found:
        count = f"{len(found)} tensor{'s' if len(found) > 1 else ''}"
        raise error(f"{source} holds NaN/Inf values in {count}: {describe(found)}; it cannot be used")
