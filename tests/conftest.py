"""Shared fixtures. Tests run single-threaded: on a shared 2-core machine oversubscription costs 60x."""

from __future__ import annotations

import pytest
import torch

from fusion.config import get_config

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_samples(tiny_config):
    """Eight rendered training scenes, shared by every test that needs real data."""
    from fusion.data.dataset import make_sample

    return [make_sample(tiny_config, tiny_config.data.train_seed, i) for i in range(8)]
