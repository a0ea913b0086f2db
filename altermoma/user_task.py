"""`--task module:function`: load a user's model, task and data from a Python file or module.

The function takes no arguments and returns an `altermoma.Setup` (or a dict with the same keys):
`model` (freshly built, unpruned, with its trained weights), `task` (an `altermoma.Task`),
`scoring_batches` (a non-empty list of batches), and optionally `train_batches` (any re-iterable
of batches, for fine-tuning). `path/to/file.py:function` and `package.module:function` both work.

The model's arguments (`task.inputs(batch)`, default `(batch,)`) may be tensors or dicts, lists and tuples of
them with constants mixed in: `export onnx --task` names each tensor by its path, `input_0.points` for
`batch["points"]` (docs/export_nesting.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from altermoma.api import Setup
from common.task import Task


def load_setup(spec: str) -> Setup:
    """Import `spec` ("file.py:function" or "module:function"), call the function, check what it returned."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--task must look like path/to/file.py:function or module:function, got {spec!r}")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"--task file {path} does not exist")
        module_name = f"altermoma_user_task_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
        try:
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            raise ValueError(f"--task module {where!r} cannot be imported: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--task: {where} has no function {name!r}")
    return as_setup(function(), spec)


def as_setup(value: object, spec: str) -> Setup:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"model", "task", "scoring_batches", "train_batches", "extra"})
        if unknown:
            raise ValueError(f"--task {spec} returned unknown key {unknown[0]!r}")
        try:
            value = Setup(**value)
        except TypeError as error:
            raise ValueError(f"--task {spec} returned an incomplete setup: {error}") from None
    if not isinstance(value, Setup):
        raise ValueError(f"--task {spec} must return an altermoma.Setup or a dict, got {type(value).__name__}")
    if not isinstance(value.model, nn.Module):
        raise ValueError(f"--task {spec}: model must be a torch.nn.Module, got {type(value.model).__name__}")
    if not isinstance(value.task, Task):
        raise ValueError(f"--task {spec}: task must be an altermoma.Task, got {type(value.task).__name__}")
    if not isinstance(value.scoring_batches, list | tuple) or not value.scoring_batches:
        raise ValueError(f"--task {spec}: scoring_batches must be a non-empty list of batches")
    return value
