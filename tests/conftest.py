"""Shared test fixtures: compose Hydra configs in-process."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def make_cfg(*overrides: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():
    return make_cfg


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny matmuls are fastest single-threaded (and OpenMP spinning is pathological on a busy CI box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
