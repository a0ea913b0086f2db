"""The pruned-model format, for any model: `model.safetensors` plus `pruned.json`. No pickle.

`load_pruned` takes a freshly built, unpruned instance of the user's model, gives every layer the
stored widths (depthwise convs keep groups == channels) and loads the weights strictly. The folder
is written whole (staged, then swapped in) with a manifest of SHA-256 hashes, checked on load, so a
weights file from another save is refused instead of being silently paired with this report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.finite import NonFiniteError, check_finite
from common.io import OutputError, staged_directory, verify_manifest
from common.resize import ResizeError, resize_to_state_dict

FORMAT = "altermoma-pruned"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "pruned.json"


class PrunedCheckpointError(ValueError):
    """A pruned checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


class NonFinitePrunedError(PrunedCheckpointError, NonFiniteError):
    """A pruned checkpoint whose weights hold NaN or Inf (a diverged fine-tune): refused on load."""


def save_pruned(model: nn.Module, directory: str | os.PathLike, report: dict | None = None) -> Path:
    """Write the model's tensors and the pruning report; returns the folder."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with staged_directory(directory, kind="pruned") as staging:
        save_file(state, str(staging / WEIGHTS))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model_class": type(model).__qualname__,
            "tensors": len(state),
            "report": report or {},
        }
        (staging / META).write_text(json.dumps(meta, indent=2, default=_jsonable))
    return directory


def read_pruned_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META
    if not directory.is_dir():
        raise PrunedCheckpointError(f"pruned checkpoint {directory} does not exist")
    if not meta_path.is_file():
        raise PrunedCheckpointError(f"{directory} is not a pruned checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrunedCheckpointError(f"corrupt {meta_path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PrunedCheckpointError(f"{meta_path} is not an altermoma pruned checkpoint")
    return meta


def load_pruned(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Resize a freshly built `model` to the stored widths and load the stored weights; returns it (eval mode)."""
    directory = Path(directory)
    read_pruned_metadata(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise PrunedCheckpointError(f"pruned checkpoint weights {weights} are missing")
    try:
        verify_manifest(directory, [WEIGHTS, META])
    except OutputError as error:
        raise PrunedCheckpointError(str(error)) from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise PrunedCheckpointError(f"corrupt pruned checkpoint weights {weights}: {error}") from None
    check_finite(state, f"pruned checkpoint {directory}", NonFinitePrunedError)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise PrunedCheckpointError(
            f"{directory} does not fit this model ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    try:
        resize_to_state_dict(model, state)
    except ResizeError as error:
        raise PrunedCheckpointError(f"{directory} does not fit this model: {error}") from None
    own = model.state_dict()
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise PrunedCheckpointError(
                f"{directory}: tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
    return model.eval()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)
