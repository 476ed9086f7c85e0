"""What every benchmark script shares: the offline data/weights beside the repo and the real config.

Benchmarks run as scripts (``python benchmarks/<name>.py``), so this folder is on ``sys.path``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def offline_env() -> None:
    """Read ../shared (data, weights) unless the caller set other paths; no W&B."""
    os.environ.setdefault("CALIBBENCH_DATA_DIR", str(SHARED / "data"))
    os.environ.setdefault("CALIBBENCH_WEIGHTS_DIR", str(SHARED / "weights"))
    os.environ.setdefault("WANDB_MODE", "disabled")


def compose(*overrides: str):  # noqa: ANN201 - a DictConfig
    """The real config from conf/, composed as tests/conftest.py does (no logger, no bars)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from calibbench.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["logger.mode=disabled", "progress=false", *overrides])


def fp_pass(model, loader) -> float:  # noqa: ANN001 - a module and a DataLoader
    """Seconds for one plain inference pass over ``loader``."""
    import time

    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            model(images)
    return time.perf_counter() - start


def fp_data_calib(cfg, n_calib: int = 0):  # noqa: ANN001, ANN201 - a DictConfig; (module, DataModule, Tensor | None)
    """The FP model (eval mode), the dataset, and ``n_calib`` train images spread over the split
    (None for 0): the setup the PTQ benchmarks share."""
    from calibbench import datasets, models

    fp = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir).module.eval()
    data = datasets.build(cfg.dataset, cfg.model)
    images = data.load(datasets.spread_indices(len(data.train), n_calib), "train")[0] if n_calib else None
    return fp, data, images
