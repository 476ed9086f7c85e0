"""Shared fixtures: the real offline data/weights in ../shared, tiny synthetic data, config composition."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

# CPU kernels differ in the last bits between instruction sets (AVX2 vs AVX-512), and training
# (reconstruction, generators) amplifies them: tests/same_numbers.json was recorded on an AVX2
# machine, and on an AVX-512 one the brecq/gdfq cases moved (a scale at 1e-6, gdfq top-1 by 5.5).
# Pin the AVX2 paths of ATen and oneDNN before torch is imported, in this process, in the xdist
# workers and in the CLI subprocesses, so the same seed gives the same numbers on any x86-64 with
# AVX2. An already set value wins (e.g. to check another ISA on purpose).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import pytest  # noqa: E402 - after the kernel pins
import torch  # noqa: E402
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONF_DIR = REPO / "conf"

# Tests read the offline data and weights; an explicit environment setting wins.
os.environ.setdefault("CALIBBENCH_DATA_DIR", str(SHARED / "data"))
os.environ.setdefault("CALIBBENCH_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread: on a 2-core machine shared with data-loader workers (and other jobs), more threads
# make the many small forward passes of the tests slower, not faster.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every module starts at one torch thread (a run with ``threads=N`` may have changed it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_twice(compose: Callable, tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """Two runs of the same config with separate caches (the second recomputes everything): the
    determinism check of every strategy and refiner."""
    from calibbench.pipeline import run

    def cfg(cache: str):
        return compose(*overrides, f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / cache}")

    a, b = run(cfg("c1"), tmp_path / "a"), run(cfg("c2"), tmp_path / "b")
    assert not b["calibration"]["cache_hit"]
    assert a["metrics"]["quant"] == b["metrics"]["quant"]
    assert a["refine"]["curve"] == b["refine"]["curve"]
    return a, b


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if not (SHARED / "data" / "cifar10-jpeg").is_dir():
        skip = pytest.mark.skip(reason=f"offline data not found at {SHARED / 'data'}")
        for item in items:
            if "needs_shared" in item.keywords:
                item.add_marker(skip)


class TensorImages(Dataset):
    """In-memory images with a ``targets`` list, shaped like the torchvision datasets."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets.tolist()
        self.classes = sorted(set(self.targets))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.images[i], self.targets[i]


def tiny_datamodule(n_train: int = 64, n_val: int = 32, num_classes: int = 10, size: int = 32,
                    seed: int = 0):
    from calibbench.datasets import DataModule

    g = torch.Generator().manual_seed(seed)
    train = TensorImages(torch.randn(n_train, 3, size, size, generator=g),
                         torch.arange(n_train) % num_classes)
    val = TensorImages(torch.randn(n_val, 3, size, size, generator=g), torch.arange(n_val) % num_classes)
    return DataModule("tiny", train, val, num_classes, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                      num_workers=0)


@pytest.fixture
def tiny_data():
    return tiny_datamodule()


def config_composer() -> Callable:
    """compose(*overrides) -> the real config from conf/, with test-friendly defaults first (also
    used outside pytest: tests/test_same_numbers.py --write)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from calibbench.store import register_configs

    register_configs()

    def _compose(*overrides: str, return_hydra_config: bool = False):
        # dataset.num_workers=0: a smoke run reads a few hundred 32x32 JPEGs, which decode in this
        # process faster than DataLoader workers start (~1.5 s of a ~7 s run); the worker path is
        # exercised by the CLI and sweep tests, which do not compose through here.
        base = ["logger.mode=disabled", "progress=false", "dataset.num_workers=0"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=[*base, *overrides],
                                 return_hydra_config=return_hydra_config)

    return _compose


@pytest.fixture(scope="session")
def compose() -> Callable:
    return config_composer()


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """A tiny ImageNet-layout tree (1000 wnid folders, 3 train + 1 val JPEG each; tests/
    imagenet_fixture.py), written once per session in about a second. Read-only: a test that
    damages files writes its own tree."""
    from imagenet_fixture import write_imagenet_tree

    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def cifar(compose):
    """The real offline cifar10_jpeg data module (both splits, lazy: nothing decoded up front)."""
    from calibbench import datasets

    cfg = compose()
    return datasets.build(cfg.dataset, cfg.model)


@pytest.fixture(scope="session")
def resnet20(compose):
    """The offline pretrained resnet20_cifar10 in eval mode (88.41% on cifar10_jpeg test)."""
    from calibbench import models

    cfg = compose()
    return models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir).module


@pytest.fixture
def make_ctx():
    """make_ctx(model, data, **overrides) -> StrategyContext on the CPU at the smoke budget."""
    from calibbench.config import BudgetConfig
    from calibbench.strategies import StrategyContext

    def _make(model, data, num_samples: int = 16, seed: int = 0, **budget):
        fields = dict(name="smoke", eval_limit=64, eval_batch_size=32, calib_batch_size=16,
                      pool_size=64, synth_iterations=4, synth_batch_size=8, refine_steps=0,
                      refine_batch_size=8, plf_samples=16, plf_iterations=4)
        fields.update(budget)
        return StrategyContext(model=model, data=data, device=torch.device("cpu"), seed=seed,
                               num_samples=num_samples, budget=BudgetConfig(**fields), progress=False)

    return _make
