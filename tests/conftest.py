"""Shared fixtures: offline hub, composed-and-shrunk configs, tiny timm models, synthetic data."""
from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ["VISIONFT_CACHE_DIR"] = tempfile.mkdtemp(prefix="visionft-test-cache-")  # no test reuses a user's cache
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist: the suite runs on every core
if _WORKERS > 1:  # each worker (and the CLI runs it starts) gets its share of the cores, not all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

TINY = [
    "data=synthetic",
    "backbone.name=test_resnet",
    "backbone.pretrained=false",
    "data.train_size=160",
    "data.test_size=40",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same random state, whichever tests ran before it in its worker."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)


def compose_cfg(overrides: list[str] = (), output_dir=None) -> DictConfig:
    with initialize_config_module("visionft.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composed config shrunk to a tiny ResNet on 32 px synthetic data; pass extra overrides."""

    def make(*overrides: str, output_dir=None) -> DictConfig:
        return compose_cfg([*TINY, *overrides], output_dir or tmp_path / "run")

    return make
