"""Checkpoints without pickle: `model.safetensors` plus `checkpoint.json` in one directory.

`checkpoint.json` holds the full config, the modality and free-form metadata (training step, metrics,
and for pruned models the pruning plan). A pruned model is rebuilt from its base config and then
every layer is resized to the shapes stored in the weights file ("explicit widths"), so loading needs
neither torch-pruning nor the code that pruned it, and `export` can load any checkpoint.
Every file is written to a temporary name and renamed, so a crash never leaves half a checkpoint.
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
from common.io import OutputError, fault_point, staged_directory, verify_manifest
from common.resize import ResizeError
from common.resize import resize_to_state_dict as resize
from fusion.config import Config, ConfigError
from fusion.models.bevfusion import BEVFusion, build_model

FORMAT = "altermoma-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "checkpoint.json"
TRAIN_STATE = "train_state.safetensors"
TRAIN_STATE_META = "train_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model it describes."""


class NonFiniteCheckpointError(CheckpointError, NonFiniteError):
    """A checkpoint whose weights hold NaN or Inf (a diverged run): refused on load, by the API and the CLI."""


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors (safetensors refuses shared storage; a rank may train on a GPU)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    directory: str | os.PathLike,
    model: BEVFusion,
    metadata: dict[str, Any] | None = None,
    train_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Weights, metadata and (optionally) the optimizer state, written as one folder, swapped in whole.

    `train_state` is (tensors, json-able meta) from `fusion.train.train_state`: saved together with
    the weights, so a crash can never pair step-4 weights with step-3 optimizer moments.
    """
    meta = {"format": FORMAT, "version": VERSION, "modality": model.modality, "config": model.config.to_dict()}
    meta.update(metadata or {})
    with staged_directory(directory, kind="checkpoint") as staging:
        save_file(state_dict_for_saving(model), str(staging / WEIGHTS))
        fault_point()
        if train_state is not None:
            tensors, state_meta = train_state
            save_file(tensors, str(staging / TRAIN_STATE))
            fault_point()
            (staging / TRAIN_STATE_META).write_text(json.dumps(state_meta))
            fault_point()
        (staging / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        fault_point()
    return Path(directory)


def verify_files(directory: str | os.PathLike, names: list[str]) -> None:
    """The files belong to this checkpoint (its manifest), not to another save."""
    try:
        verify_manifest(directory, names)
    except OutputError as error:
        raise CheckpointError(str(error)) from None


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint folder")
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not an altermoma checkpoint (format {meta.get('format')!r})")
    return meta


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, checked against its manifest and refused if any holds NaN or Inf."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights {path} are missing")
    verify_files(directory, [WEIGHTS, META])
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"corrupt checkpoint weights {path}: {error}") from None
    check_finite(state, f"checkpoint {directory}", NonFiniteCheckpointError)
    return state


def resize_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Give every layer the channel counts found in `state` (see `common.resize`); returns layers resized."""
    try:
        return resize(model, state)
    except ResizeError as error:
        raise CheckpointError(str(error)) from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error naming the first offending tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(
            f"{source} does not fit this model ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)


def load_checkpoint(directory: str | os.PathLike, expect_preset: str | None = None) -> tuple[BEVFusion, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (pruned or not) and load its weights.

    Every tensor is checked against the config first: an unpruned checkpoint must match it exactly;
    a pruned one may differ only in prunable widths, never in a protected layer (a head's class
    count, the depth bins), so a 2-class head does not load into a 3-class config.
    """
    meta = read_metadata(directory)
    try:
        config = Config.from_dict(meta["config"]).validate()
    except (ConfigError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory} has an invalid config: {error}") from None
    if expect_preset is not None and config.preset != expect_preset:
        raise CheckpointError(f"checkpoint {directory} is preset {config.preset!r}, expected {expect_preset!r}")
    model = build_model(config, meta.get("modality", "fusion"))
    state = read_weights(directory)
    check_against_config(model, state, pruned=bool(meta.get("pruning")), source=f"checkpoint {directory}")
    resize_to_state_dict(model, state)
    load_into(model, state, f"checkpoint {directory}")
    model.eval()
    return model, meta


def check_against_config(model: BEVFusion, state: dict[str, torch.Tensor], pruned: bool, source: str) -> None:
    """One-line error for a tensor whose shape the config does not allow."""
    own = model.state_dict()
    fixed = {name for name, m in model.named_modules() if any(m is p for p in model.protected_modules())}
    for key, tensor in state.items():
        if key not in own or own[key].shape == tensor.shape:
            continue
        layer = key.rsplit(".", 1)[0]
        # A protected layer keeps its outputs (dim 0: classes, depth bins); its inputs may be pruned.
        outputs_changed = layer in fixed and (
            tensor.shape[0] != own[key].shape[0] or tensor.shape[2:] != own[key].shape[2:]
        )
        if not pruned or outputs_changed or own[key].dim() != tensor.dim():
            why = "a protected layer" if pruned and outputs_changed else "the config"
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, but {why} needs {tuple(own[key].shape)} "
                "(a checkpoint of another config?)"
            )
