"""The embedded default data set: synthetic multi-sensor scenes as a PyTorch Dataset.

Scene i of a split is drawn from `numpy.random.default_rng([split_seed, i])`, so every scene is
reproducible on its own, bit for bit, whatever order or subset is asked for. Rendering costs a few
tens of milliseconds per scene, so each scene is rendered once and kept in a disk cache
(`fusion.data.cache`); a data set object holds no scenes, whatever its size, and DataLoader workers
and torchrun ranks share the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from common import dist
from common.progress import progress_bar
from fusion.config import Config
from fusion.data.cache import SceneCache
from fusion.data.render import bev_map, render_cameras, scan_lidar
from fusion.data.scenes import sample_scene
from fusion.data.sparse_inputs import PREFIX as RULEBOOK_PREFIX
from fusion.data.sparse_inputs import collate_rulebooks, lidar_arrays
from fusion.data.targets import build_targets
from fusion.geometry import bev_cell_centres


def make_sample(
    config: Config, seed: int, index: int, points_transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Render scene `index` of the stream `seed` and build every network input and target.

    `points_transform` changes the raw LiDAR sweep (P, 4) before it is pillarised or voxelised (the robustness
    corruptions of `fusion.data.corruptions`); it must not draw from this scene's generator, so every other
    array of the sample stays the clean one, bit for bit."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, config.grid, config.data)
    images = render_cameras(scene, config.rig, config.data, rng)
    points = scan_lidar(scene, config.lidar, config.data, rng)
    if points_transform is not None:
        points = points_transform(points)
    lidar = lidar_arrays(points, config, rng)  # pillars or voxels + rulebooks, by model.lidar_encoder

    objects = scene.boxes[: scene.num_objects]
    labels = np.array([config.data.classes.index(k) for k in scene.kinds[: scene.num_objects]], dtype=np.int64)
    k_max = config.data.max_objects
    boxes = np.zeros((k_max, 7), dtype=np.float32)
    padded_labels = np.full(k_max, -1, dtype=np.int64)
    boxes[: len(objects)] = objects[:k_max]
    padded_labels[: len(labels)] = labels[:k_max]

    grid_x, grid_y = bev_cell_centres(config.grid)
    sample = {
        "images": images,
        **lidar,
        "boxes": boxes,
        "labels": padded_labels,
        "bev_map": bev_map(scene, grid_x, grid_y, config.grid.cell),
    }
    sample.update(build_targets(objects, labels, config.grid, len(config.data.classes), k_max))
    return sample


class SyntheticScenes(Dataset):
    """Scenes of one split ("train" or "val"), streamed from the scene cache.

    Construction renders the scenes missing from the cache (with a progress bar; under torchrun each
    rank renders its share), so the first epoch costs no more than later ones; nothing stays in memory.
    """

    def __init__(self, config: Config, split: str = "train", num_scenes: int | None = None, progress: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.config = config
        self.seed = config.data.train_seed if split == "train" else config.data.val_seed
        count = num_scenes if num_scenes is not None else getattr(config.data, f"{split}_scenes")
        if count < 1:
            raise ValueError(f"a split needs at least one scene, got {count}")
        self.count = count
        self.cache = SceneCache(config, self.seed, self._render)
        missing = [i for i in range(count) if self.cache.folder is not None and not self.cache.has(i)]
        mine = [missing[i] for i in dist.shard_range(len(missing))]
        for index in progress_bar(mine, desc=f"rendering {split} scenes", enabled=progress and bool(mine), leave=False):
            self.cache.ensure(index)
        dist.barrier()  # every rank constructs its data set here: the scenes are all stored after it

    def _render(self, index: int) -> dict[str, np.ndarray]:
        return make_sample(self.config, self.seed, index)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} of a {self.count}-scene split")
        return self.cache.get(index)


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples; images become float in [0, 1], integer targets stay int64; strings (nuScenes
    `sample_token`) stay a list. Sparse-encoder rulebooks (per sample, of varying length) are padded and
    nested under "rulebooks" (`fusion.data.sparse_inputs.collate_rulebooks`)."""
    batch = {
        key: [s[key] for s in samples]
        if isinstance(samples[0][key], str)
        else torch.from_numpy(np.stack([s[key] for s in samples]))
        for key in samples[0]
        if not key.startswith(RULEBOOK_PREFIX)
    }
    if any(key.startswith(RULEBOOK_PREFIX) for key in samples[0]):
        batch["rulebooks"] = collate_rulebooks(samples)
    batch["images"] = batch["images"].float().div_(255.0)
    batch["bev_map"] = batch["bev_map"].float()
    return batch


# Everything the reference networks take, in their forward's order; the rest of a batch is targets or metadata.
# frustum_cells: per-sample camera geometry (nuScenes: each car has its own calibration).
MODEL_INPUTS = ("images", "pillars", "pillar_map", "frustum_cells", "voxels", "voxel_coords", "rulebooks")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs the network takes (pillars or voxels + rulebooks, whichever the batch has)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}
