"""The synthetic data set streams from a disk cache: the same bytes as rendering, nothing kept in memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fusion.data import cache as scene_cache
from fusion.data.dataset import SyntheticScenes, make_sample


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(scene_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _equal(a: dict, b: dict) -> bool:
    """Same keys, dtypes, values and strides (the memory layout reaches the network: a channels-last
    image batch runs other conv kernels, with other rounding)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].strides == b[k].strides and np.array_equal(a[k], b[k]) for k in a
    )


def test_cached_scenes_equal_rendered_ones_bit_for_bit(tiny_config, cache_dir):
    scenes = SyntheticScenes(tiny_config, "val", num_scenes=3, progress=False)
    assert len(list(cache_dir.rglob("*.npz"))) == 3  # rendered once, at construction
    assert not hasattr(scenes, "samples")  # nothing held in memory
    for i in range(3):
        assert _equal(scenes[i], make_sample(tiny_config, tiny_config.data.val_seed, i))
    with pytest.raises(IndexError):
        scenes[3]


def test_a_corrupt_cache_file_is_rendered_again(tiny_config, cache_dir):
    scenes = SyntheticScenes(tiny_config, "train", num_scenes=1, progress=False)
    path = scenes.cache.path(0)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a crash of a process without os.replace
    assert _equal(scenes[0], make_sample(tiny_config, tiny_config.data.train_seed, 0))
    assert _equal(scenes[0], make_sample(tiny_config, tiny_config.data.train_seed, 0))  # stored again, whole


def test_the_key_follows_the_data_config_and_the_seed(tiny_config):
    darker = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, camera_brightness=0.5))
    keys = {
        scene_cache.scene_key(tiny_config, 0),
        scene_cache.scene_key(tiny_config, 1),
        scene_cache.scene_key(darker, 0),
    }
    assert len(keys) == 3
    assert scene_cache.scene_key(tiny_config, 0) == scene_cache.scene_key(tiny_config, 0)


def test_cache_off_renders_every_access_and_writes_nothing(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv(scene_cache.CACHE_ENV, "off")
    monkeypatch.setenv("HOME", str(tmp_path))
    scenes = SyntheticScenes(tiny_config, "val", num_scenes=2, progress=False)
    assert scenes.cache.folder is None
    assert _equal(scenes[1], make_sample(tiny_config, tiny_config.data.val_seed, 1))
    assert not any(tmp_path.rglob("*.npz"))


def test_an_unwritable_cache_falls_back_to_rendering(tiny_config, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv(scene_cache.CACHE_ENV, str(blocker))
    with pytest.warns(UserWarning, match="scene cache disabled"):
        scenes = SyntheticScenes(tiny_config, "val", num_scenes=1, progress=False)
    assert _equal(scenes[0], make_sample(tiny_config, tiny_config.data.val_seed, 0))
