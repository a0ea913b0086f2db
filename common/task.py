"""The task description: everything `compress` and `export` know about a user's model.

A model reaches the toolkit as an `nn.Module` plus a `Task`: which modules form the camera
backbone, the LiDAR backbone and the fusion part, how a batch becomes the model's arguments, and
the loss. Nothing else is asked of the model: no attributes, no base class. It lives in `common`
so that model code (ours in `fusion`, or a user's) can build one without importing `compress`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PARTS = ("camera", "lidar", "fusion")


class TaskError(ValueError):
    """A task description that does not fit the model or the batches it is used with."""


@dataclass
class Task:
    """How the toolkit sees a model.

    partition: "camera", "lidar", "fusion" -> module-name prefixes (modules without parameters are
        allowed; every parameter must belong to exactly one part).
    loss: `loss(outputs, batch)` -> a scalar tensor.
    inputs: `inputs(batch)` -> a tuple (positional arguments) or a dict (keyword arguments) for
        `model(...)`; default `(batch,)`.
    protected: names of modules (or module prefixes) whose output channels are never pruned, on top
        of the output layers found from the graph.
    trace: optional `trace(model)` context manager entered while torch-pruning traces the graph, for
        models whose forward needs a channel-preserving stand-in during tracing (the reference LSS
        view transform uses one).
    """

    partition: Mapping[str, Sequence[str]]
    loss: Callable[[Any, Any], torch.Tensor]
    inputs: Callable[[Any], Any] | None = None
    protected: Sequence[str] = ()
    trace: Callable[[nn.Module], AbstractContextManager] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.partition, Mapping):
            raise TaskError(f"partition must map part names to prefixes, got {type(self.partition).__name__}")
        if not callable(self.loss):
            raise TaskError("loss must be a callable loss(outputs, batch) -> scalar tensor")
        if self.inputs is not None and not callable(self.inputs):
            raise TaskError("inputs must be a callable inputs(batch) -> tuple or dict")
        if isinstance(self.protected, str):
            self.protected = (self.protected,)
        self.partition = {part: _prefix_tuple(part, prefixes) for part, prefixes in self.partition.items()}

    def arguments(self, batch: Any) -> tuple[tuple, dict]:
        """(positional, keyword) arguments of `model(...)` for one batch."""
        value = self.inputs(batch) if self.inputs is not None else (batch,)
        if isinstance(value, Mapping):
            return (), dict(value)
        if isinstance(value, tuple | list):
            return tuple(value), {}
        return (value,), {}

    def forward(self, model: nn.Module, batch: Any) -> Any:
        args, kwargs = self.arguments(batch)
        return model(*args, **kwargs)

    def loss_of(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The task loss, checked to be a scalar tensor (a wrong loss fails here, with its type named)."""
        loss = self.loss(outputs, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TaskError(f"the task loss must return a scalar tensor, got {shape}")
        return loss.reshape(())

    def tracing(self, model: nn.Module) -> AbstractContextManager:
        return self.trace(model) if self.trace is not None else nullcontext()


def _prefix_tuple(part: str, prefixes: Any) -> tuple[str, ...]:
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    if not all(isinstance(p, str) and p for p in prefixes):
        raise TaskError(f"partition {part!r}: prefixes must be non-empty strings, got {prefixes!r}")
    return tuple(prefixes)


def tensor_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Every tensor among a call's arguments, in order."""
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
