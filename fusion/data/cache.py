"""A disk cache of rendered synthetic scenes, so no process holds a data set in memory.

A scene is a pure function of the data configuration, the seed stream, its index and the rendering
code, so the cache key is a hash of exactly those: the config sections `make_sample` reads and the
source of the modules that render. Editing the renderer or a sensor knob starts a fresh cache folder
instead of serving stale scenes.

Each scene is one compressed `.npz` (about 0.5 MB at the tiny preset, mostly padded pillars that
compress away), written to a temporary name and renamed, so concurrent writers (DataLoader workers,
torchrun ranks) never leave a torn file; a file that fails to load is rendered again.

Location: `$ALTERMOMA_CACHE`, else `$XDG_CACHE_HOME/altermoma/scenes`, else `~/.cache/altermoma/scenes`.
`ALTERMOMA_CACHE=off` renders every access and writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fusion.config import Config

CACHE_ENV = "ALTERMOMA_CACHE"
FORMAT = 2  # bump when the file layout changes
_RENDER_MODULES = ("dataset", "scenes", "render", "pillars", "targets")
_SPARSE_MODULES = ("sparse_inputs", "voxelize", "../../common/sparse")  # voxels and rulebooks (sparse encoder)

Sample = dict[str, np.ndarray]


def cache_root() -> Path | None:
    """The cache folder, or None when caching is off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("off", "0", "none", "") else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "altermoma" / "scenes"


def _code_fingerprint(extra: tuple[str, ...] = ()) -> str:
    """Hash of the rendering code (and the `extra` modules): scenes from older code are never served."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in (*_RENDER_MODULES, "../geometry", "../config", *extra):
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def scene_key(config: Config, seed: int) -> str:
    """Folder name of one seed stream under one data configuration and one version of the code."""
    m = config.model
    sparse = m.lidar_encoder != "pillars"  # the samples hold voxels and rulebooks of the encoder's geometry
    described = {
        "format": FORMAT,
        "code": _code_fingerprint(_SPARSE_MODULES if sparse else ()),
        "seed": seed,
        **{part: dataclasses.asdict(getattr(config, part)) for part in ("data", "grid", "rig", "lidar")},
    }
    if sparse:
        described["lidar_encoder"] = [m.lidar_encoder, [len(s) for s in m.sparse_channels], m.sparse_down_padding]
    blob = json.dumps(described, sort_keys=True, default=str).encode()
    return f"seed{seed}-{hashlib.sha256(blob).hexdigest()[:16]}"


class SceneCache:
    """Scenes of one seed stream: `get(i)` loads scene i, rendering and storing it first if needed."""

    def __init__(self, config: Config, seed: int, render: Callable[[int], Sample], root: Path | None = None):
        self.render = render
        root = cache_root() if root is None else root
        self.folder = None if root is None else root / scene_key(config, seed)

    def path(self, index: int) -> Path | None:
        return None if self.folder is None else self.folder / f"{index:06d}.npz"

    def has(self, index: int) -> bool:
        path = self.path(index)
        return path is not None and path.is_file()

    def get(self, index: int) -> Sample:
        path = self.path(index)
        if path is not None and path.is_file():
            loaded = _load(path)
            if loaded is not None:
                return loaded
        sample = self.render(index)
        self._store(index, sample)
        return sample

    def ensure(self, index: int) -> None:
        """Render and store scene `index` unless it is already stored (nothing is kept in memory)."""
        if self.folder is not None and not self.has(index):
            self._store(index, self.render(index))

    def _store(self, index: int, sample: Sample) -> None:
        path = self.path(index)
        if path is None:
            return
        try:
            _store(path, sample)
        except OSError as error:  # a read-only or full disk: keep working, rendering every access
            warnings.warn(f"scene cache disabled, cannot write {path}: {error}", stacklevel=3)
            self.folder = None


def _load(path: Path) -> Sample | None:
    """A stored scene, or None if the file is unreadable (it is then rendered and stored again)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    sample = {}
    for key, value in arrays.items():
        if key.startswith(_AXES):
            continue
        axes = arrays.get(_AXES + key)
        sample[key] = value.transpose(np.argsort(axes)) if axes is not None else value
    return sample


# The renderer's images are channel-last in memory behind a (N, 3, H, W) view, and that layout reaches
# the network (torch keeps the strides: a channels-last batch runs other conv kernels, with other float
# rounding). A stored array is therefore saved in its memory order with the axis permutation beside it,
# and loaded as the same view, so a cached scene is the rendered one, strides included.
_AXES = "__axes__"


def _memory_order(value: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(array to save, axes to restore) so that loading gives back `value`'s strides; None: C order."""
    if value.ndim < 2 or value.flags.c_contiguous:
        return value, None
    axes = np.argsort([-s for s in value.strides], kind="stable")
    permuted = value.transpose(axes)
    return (permuted, axes) if permuted.flags.c_contiguous else (value, None)


def _store(path: Path, sample: Sample) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for key, value in sample.items():
        arrays[key], axes = _memory_order(np.asarray(value))
        if axes is not None:
            arrays[_AXES + key] = axes
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
