"""Inputs of the sparse voxel LiDAR encoder: voxels and their rulebooks, built per sample in preprocessing.

Why here and per sample: rulebooks (which input row meets which output row through which kernel offset) take
sorting and searching, which the forward pass must not do (no sort/unique/nonzero in the graph, static shapes).
Built per sample, they are made once per scene and stored with it in the scene cache (`fusion.data.cache`), and
a batch is a padded stack: every tensor of a batch keeps the sample dimension first, so the first sample of a
batch is a batch of one (`fusion.task.first_sample`), exactly as for the pillar inputs (`fusion.data.pillars`).

One sample (`voxel_inputs`), M = lidar.max_voxels, K = kernel volume, rows = sites of a level of the encoder:

    voxels                  (M, F) float32   mean of each voxel's points (mmcv hard voxelisation + HardSimpleVFE)
    voxel_coords            (M, 3) int32     (z, y, x) of each voxel; padding rows -1
    rulebooks.<key>.gather  (rows, K) int32  input row (of this sample) reaching output row o through offset k; -1 none
    rulebooks.<key>.coords  (rows, 3) int32  output sites of strided conv <key>, sorted by (z, y, x)
    rulebooks.dense         (D*H*W,) int32   row of the last level's site at each cell of the output grid; -1 empty

`collate_rulebooks` pads each rulebook array of a batch with -1 rows to the longest and stacks them, (B, rows, ...)
int64 under `batch["rulebooks"]["<key>.gather" | "<key>.coords" | "dense"]`. The model
(`fusion.models.voxel_lidar`) turns those into one batch-wide `common.sparse` indice_dict with index arithmetic
only (Add, Where), so they are plain graph inputs of an ONNX export.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from common import sparse as plain_sparse
from fusion.config import Config, point_cloud_range, sparse_paddings, sparse_shape
from fusion.data.pillars import pillarize
from fusion.data.voxelize import voxelize

PREFIX = "rulebooks."  # sample keys of rulebook arrays; the batch nests them under "rulebooks"
DENSE = "dense"
EMULATED_SWEEP_STEP = 0.5  # metres the ego moves between emulated sweeps (10 m/s, sweeps 0.05 s apart)


@functools.cache
def _layer_specs(shape: tuple[int, int, int], stages: tuple, paddings: tuple) -> tuple[plain_sparse.LayerSpec, ...]:
    from fusion.models.sparse_encoder import SparseEncoder

    widths = tuple((1,) * len(stage) for stage in stages)  # channels do not change the geometry
    return tuple(SparseEncoder(1, shape, 1, 1, widths, paddings).layer_specs())


def layer_specs(config: Config) -> tuple[plain_sparse.LayerSpec, ...]:
    """Every sparse conv of the config's encoder, in forward order (what its rulebooks are built from)."""
    m = config.model
    return _layer_specs(sparse_shape(config), m.sparse_channels, sparse_paddings(m))


def lidar_arrays(points: np.ndarray, config: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The network's LiDAR inputs of one cloud for the config's encoder: pillars and the cell-to-pillar map
    (`model.lidar_encoder` "pillars", drawing from `rng`), or voxels, coordinates and rulebooks ("sparse")."""
    if config.model.lidar_encoder == "sparse":
        return voxel_inputs(points, config)
    pillars, pillar_map, _ = pillarize(points, config.grid, config.lidar, rng)
    return {"pillars": pillars, "pillar_map": pillar_map}


def voxel_inputs(points: np.ndarray, config: Config) -> dict[str, np.ndarray]:
    """Voxels, coordinates and rulebooks of one point cloud (P, F) (see the module docstring for the keys)."""
    lidar = config.lidar
    voxels = voxelize(
        points[:, : lidar.point_features],
        lidar.voxel_size,
        point_cloud_range(config.grid),
        lidar.max_voxels,
        lidar.max_points_per_voxel,
    )
    book = plain_sparse.build_rulebooks(voxels.indices, sparse_shape(config), 1, layer_specs(config))
    arrays = {"voxels": voxels.features, "voxel_coords": np.ascontiguousarray(voxels.indices[:, 1:])}
    last = None
    for key, rulebook in book.items():
        gather = rulebook.gather_index.numpy()
        arrays[f"{PREFIX}{key}.gather"] = np.where(gather < rulebook.in_sites.num_rows, gather, -1).astype(np.int32)
        if not rulebook.subm:
            arrays[f"{PREFIX}{key}.coords"] = rulebook.out_sites.indices.numpy()[:, 1:].copy()
        last = rulebook.out_sites
    dense = last.dense_index.numpy()
    arrays[PREFIX + DENSE] = np.where(dense < last.num_rows, dense, -1).astype(np.int32)
    return arrays


def collate_rulebooks(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The samples' rulebook arrays, each padded with -1 rows to the batch's longest and stacked (int64)."""
    keys = [k for k in samples[0] if k.startswith(PREFIX)]
    return {key[len(PREFIX) :]: torch.from_numpy(pad_stack([s[key] for s in samples])).long() for key in keys}


def pad_stack(arrays: Sequence[np.ndarray], rows: int | None = None) -> np.ndarray:
    """Stack arrays that differ only in their first dim, padding each with -1 rows to `rows` (default: longest)."""
    rows = max(len(a) for a in arrays) if rows is None else rows
    out = np.full((len(arrays), rows, *arrays[0].shape[1:]), -1, dtype=arrays[0].dtype)
    for i, array in enumerate(arrays):
        if len(array) > rows:
            raise ValueError(f"a sample has {len(array)} rows, more than the {rows} asked for")
        out[i, : len(array)] = array
    return out


def pad_rulebooks(rulebooks: dict[str, torch.Tensor], rows: dict[str, int], config: Config) -> dict[str, torch.Tensor]:
    """Batch rulebooks padded with -1 rows to fixed row counts per level (`{strided conv key: rows}`), so that
    one exported graph serves every cloud: the level's `.coords`, `.gather` and the SubM rulebooks on it grow.
    More real rows than asked for is an error, never a silent drop."""
    out = dict(rulebooks)
    level = None  # the strided conv whose output sites the next layers read (None: the voxels themselves)
    for spec in layer_specs(config):
        if spec.conv1x1:
            continue
        if not spec.subm:
            level = spec.indice_key
        if level in rows:
            for name in (f"{spec.indice_key}.gather", f"{spec.indice_key}.coords"):
                if name in out and out[name].shape[1] != rows[level]:
                    out[name] = _pad_rows(out[name], rows[level], name)
    return out


def _pad_rows(tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if tensor.shape[1] > rows:
        raise ValueError(f"{name} has {tensor.shape[1]} rows, more than the {rows} asked for")
    pad = tensor.new_full((tensor.shape[0], rows - tensor.shape[1], *tensor.shape[2:]), -1)
    return torch.cat([tensor, pad], dim=1)


def synthetic_cloud(config: Config, seed: int = 0) -> np.ndarray:
    """A LiDAR point cloud (P, lidar.point_features) of one synthetic scene on the config's grid and LiDAR, for
    example inputs (counting, tracing, export): realistic sparsity, unlike uniform random voxels.

    With `lidar.sweeps` > 0 the earlier sweeps are emulated as nuScenes merges them: the same scene scanned
    from where the ego was (EMULATED_SWEEP_STEP metres back per sweep), moved into the key frame, with the time
    lag as the fifth feature. Scenes of classes the renderer has no shapes for (nuScenes') hold the default
    synthetic classes instead: only the geometry matters here."""
    from fusion.config import DataConfig
    from fusion.data.render import scan_lidar
    from fusion.data.scenes import SIZE_PRIORS, sample_scene

    rng = np.random.default_rng([seed, 7])
    data = config.data
    if not set(data.classes) <= set(SIZE_PRIORS):
        data = dataclasses.replace(data, classes=DataConfig().classes)
    scene = sample_scene(rng, config.grid, data)
    clouds = []
    for sweep in range(config.lidar.sweeps + 1):
        shift = sweep * EMULATED_SWEEP_STEP
        moved = scene.boxes.copy()
        moved[:, 0] += shift
        roads = scene.roads.copy()
        roads[:, 0] += shift
        points = scan_lidar(dataclasses.replace(scene, boxes=moved, roads=roads), config.lidar, data, rng)
        points[:, 0] -= shift
        lag = np.full((len(points), 1), 0.05 * sweep, dtype=np.float32)
        clouds.append(np.concatenate([points, lag], axis=1)[:, : config.lidar.point_features])
    return np.concatenate(clouds)


ROW_HEADROOM = 1.25  # derived export rows: the most the clouds at hand need, plus a quarter
ROW_MULTIPLE = 64


def strided_keys(config: Config) -> list[str]:
    """The strided convs' indice keys in forward order: each opens a level of output sites."""
    return [spec.indice_key for spec in layer_specs(config) if not spec.subm and not spec.conv1x1]


def level_rows(rulebooks: dict[str, torch.Tensor], config: Config) -> dict[str, int]:
    """Real output sites of each strided conv's level in a batch's rulebooks (the most any sample has)."""
    return {key: int((rulebooks[f"{key}.coords"][..., 0] >= 0).sum(dim=1).max()) for key in strided_keys(config)}


def graph_rows(config: Config) -> tuple[dict[str, int], str]:
    """Rows per level of every graph exported from `example_inputs` (their rulebooks are padded to these), and
    where they come from: `lidar.sparse_rows` where set; else the example cloud's (`synthetic_cloud(config, 0)`)
    sites per level with ROW_HEADROOM, rounded up to ROW_MULTIPLE."""
    keys = strided_keys(config)
    if config.lidar.sparse_rows:
        return dict(zip(keys, config.lidar.sparse_rows)), "lidar.sparse_rows"
    example = collate_rulebooks([voxel_inputs(synthetic_cloud(config, 0), config)])
    rows = {k: -(-int(n * ROW_HEADROOM) // ROW_MULTIPLE) * ROW_MULTIPLE for k, n in level_rows(example, config).items()}
    return rows, f"the example cloud's sites +25%, rounded up to {ROW_MULTIPLE} (lidar.sparse_rows is not set)"


def graph_padding(config: Config) -> tuple[Callable[[dict], dict], dict | None]:
    """A function giving any batch's model inputs the shapes every graph exported from `example_inputs` has
    (rulebooks padded to `graph_rows`, computed once here), and {"rows", "origin"}; for a config without the
    sparse encoder, the identity and None."""
    if config.model.lidar_encoder != "sparse":
        return (lambda inputs: inputs), None
    rows, origin = graph_rows(config)
    return (lambda inputs: pad_inputs(inputs, rows, config)), {"rows": rows, "origin": origin}


def pad_inputs(inputs: dict, rows: dict[str, int], config: Config) -> dict:
    """Model inputs with their rulebooks padded to `rows` per level (what an exported graph takes). A batch
    needing more rows than a level has raises ValueError naming `lidar.sparse_rows`."""
    if "rulebooks" not in inputs:
        return inputs
    need = level_rows(inputs["rulebooks"], config)
    over = {k: n for k, n in need.items() if n > rows[k]}
    if over:
        detail = ", ".join(f"{k}: {n} > {rows[k]}" for k, n in over.items())
        raise ValueError(
            f"a cloud has more sparse sites than the exported graph holds ({detail}): raise lidar.sparse_rows"
        )
    # A batch is padded to its longest sample, which is `need`: growing each level to `rows` is all it takes.
    return {**inputs, "rulebooks": pad_rulebooks(dict(inputs["rulebooks"]), rows, config)}
