"""Shared fixtures. Tests run single-threaded: on a shared 2-core machine oversubscription costs 60x.

The default run (`make test`, `pytest -q`) deselects tests marked `slow` (pyproject: `-m 'not slow'`); `make
test-slow` runs them. A test module may name parametrized cases that only repeat, on more models or more
inputs, what a faster case in the default set checks: `SLOW_CASES = {"test_name[id]", ...}` marks them slow.
"""

from __future__ import annotations

import pytest
import torch

from fusion.config import get_config

torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if item.name in getattr(module, "SLOW_CASES", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts single-threaded, whatever the test before it set (a CLI verb sets --threads, default 2):
    with two xdist workers a file's tests run after other files' in any order, and spconv's CPU kernels race
    with more than one thread."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_config():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_samples(tiny_config):
    """Eight rendered training scenes, shared by every test that needs real data."""
    from fusion.data.dataset import make_sample

    return [make_sample(tiny_config, tiny_config.data.train_seed, i) for i in range(8)]
