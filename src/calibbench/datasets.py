"""Datasets: the train split feeds calibration, the test split is what tables report.

A validation split (``dataset.val_size`` images, drawn with ``dataset.val_seed`` from the train
split) is held out of every calibration and selection pool: defaults and hyperparameters are
chosen on it (``eval_split=val``), never on the test split. Its draw does not depend on the run
seed, so every run and strategy sees the same validation images and the same pool.

Both splits use deterministic eval transforms (no augmentation): a calibration image is the same
tensor every time it is drawn, which keeps selection and caching reproducible.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T

from calibbench.config import ConfigError, DatasetConfig, ModelConfig

log = logging.getLogger(__name__)

# Normalizations of the GDFQ code family ("true" per-channel stds), for `normalization=legacy_gdfq`.
LEGACY_GDFQ = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
FAMILY = {"cifar10": "cifar10", "cifar10_jpeg": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
EVAL_SPLITS = ("test", "val")


def holdout_indices(n_train: int, val_size: int, val_seed: int) -> list[int]:
    """The validation split: ``val_size`` train indices (sorted), a uniform seeded draw."""
    if val_size <= 0:
        return []
    seed = int.from_bytes(hashlib.sha256(f"{int(val_seed)}/val_split".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return sorted(torch.randperm(n_train, generator=gen)[:val_size].tolist())


@dataclass
class DataModule:
    """The splits plus what a strategy needs to make or read images in the model's input space.

    ``train`` is the whole train split (recorded indices always refer to it); ``holdout`` lists
    its validation indices and ``pool`` the rest, sorted: the only images a strategy may draw.
    ``test`` is the dataset's own evaluation split (CIFAR test, ImageNet val).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_workers: int = 2
    holdout: list[int] = field(default_factory=list)
    pool: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        keep = torch.ones(len(self.train), dtype=torch.bool)  # type: ignore[arg-type]
        keep[torch.tensor(self.holdout, dtype=torch.long)] = False
        self.pool = keep.nonzero().flatten()

    def eval_set(self, split: str = "test", limit: Optional[int] = None) -> tuple[Dataset, list[int]]:
        """(dataset, indices) to evaluate on: the test split, or the validation split carved from
        train; ``limit`` keeps that many indices spread evenly (class-sorted folders stay balanced)."""
        if split == "test":
            return self.test, spread_indices(len(self.test), limit)  # type: ignore[arg-type]
        if split != "val":
            raise ConfigError(f"unknown eval_split {split!r}; valid choices: {', '.join(EVAL_SPLITS)}")
        if not self.holdout:
            raise ConfigError("eval_split=val needs a validation split: set dataset.val_size > 0")
        return self.train, [self.holdout[i] for i in spread_indices(len(self.holdout), limit)]

    def loader(self, dataset: Dataset, batch_size: int, indices: Optional[Sequence[int]] = None,
               num_workers: Optional[int] = None) -> DataLoader:
        """A streaming, ordered loader over ``dataset`` (optionally a subset of it)."""
        if indices is not None:
            dataset = Subset(dataset, list(indices))
        workers = self.num_workers if num_workers is None else num_workers
        # An explicit start method: inside joblib's (loky) worker processes the default one cannot
        # start DataLoader workers. "fork" is what Linux uses by default anyway.
        context = "fork" if workers > 0 and "fork" in mp.get_all_start_methods() else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                          persistent_workers=False, multiprocessing_context=context)

    def load(self, indices: Sequence[int], split: str = "train", batch_size: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the images and labels at ``indices`` (calibration-sized sets only)."""
        dataset = self.train if split == "train" else self.test
        xs, ys = [], []
        workers = 0 if len(indices) <= batch_size else None
        for x, y in self.loader(dataset, batch_size, indices, num_workers=workers):
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def targets(self, split: str = "train") -> list[int]:
        """Labels without decoding images (ImageFolder and torchvision CIFAR both keep them)."""
        dataset = self.train if split == "train" else self.test
        return list(dataset.targets)  # type: ignore[attr-defined]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] RGB pixels to the model's input space."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


def _normalization(cfg: DatasetConfig, model: ModelConfig) -> tuple[tuple, tuple]:
    if cfg.normalization == "legacy_gdfq":
        return LEGACY_GDFQ[FAMILY[cfg.name]]
    return tuple(model.mean), tuple(model.std)  # type: ignore[return-value]


def _require_dir(path: Path, cfg: DatasetConfig) -> None:
    if not path.is_dir():
        raise ConfigError(
            f"dataset {cfg.name!r}: data directory {str(path)!r} does not exist. Set paths.data_dir "
            f"(or the CALIBBENCH_DATA_DIR environment variable) to the folder that holds it, or "
            f"dataset.root=PATH")


def build(cfg: DatasetConfig, model: ModelConfig) -> DataModule:
    """Build both splits. A missing folder or a failed download is a ConfigError naming the path."""
    mean, std = _normalization(cfg, model)
    size = model.input_size
    if cfg.name == "imagenet":
        resize = [T.Resize(cfg.resize or int(size / 0.875)), T.CenterCrop(size)]
    else:  # CIFAR images are 32x32; a model with a larger input gets them upsampled
        resize = [] if size == 32 else [T.Resize(size)]
    tf = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    root = Path(cfg.root)
    if cfg.name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if cfg.name == "cifar10" else tvd.CIFAR100
        if not cfg.download:
            _require_dir(root, cfg)
        try:
            train = cls(str(root), train=True, transform=tf, download=cfg.download)
            val = cls(str(root), train=False, transform=tf, download=cfg.download)
        except (RuntimeError, OSError) as err:  # no files and no network
            raise ConfigError(
                f"dataset {cfg.name!r}: could not find or download it under {str(root)!r} ({err}). "
                f"Offline, use dataset=cifar10_jpeg with paths.data_dir pointing at the JPEG copy") from err
    elif cfg.name in ("cifar10_jpeg", "imagenet"):
        val_name = "test" if cfg.name == "cifar10_jpeg" else "val"
        _require_dir(root, cfg)
        for split in ("train", val_name):
            _require_dir(root / split, cfg)
        train = tvd.ImageFolder(str(root / "train"), transform=tf)
        val = tvd.ImageFolder(str(root / val_name), transform=tf)
    else:
        raise ConfigError(f"unknown dataset {cfg.name!r}; valid choices: cifar10, cifar100, cifar10_jpeg, imagenet")
    found = len(getattr(train, "classes", [])) or cfg.num_classes
    if found != cfg.num_classes:
        raise ConfigError(f"dataset {cfg.name!r} at {str(root)!r} has {found} class folders, "
                          f"the config says {cfg.num_classes}")
    n_train = len(train)
    if not 0 <= cfg.val_size < n_train:
        raise ConfigError(f"dataset.val_size={cfg.val_size} must be >= 0 and leave a calibration pool: "
                          f"the train split has {n_train} images")
    holdout = holdout_indices(n_train, cfg.val_size, cfg.val_seed)
    log.info("dataset %s: %d train (%d held out for validation) / %d test images from %s",
             cfg.name, n_train, len(holdout), len(val), root)
    return DataModule(cfg.name, train, val, cfg.num_classes, size, mean, std, cfg.num_workers, holdout)


def spread_indices(n_total: int, n: Optional[int]) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)``: class-sorted folders stay balanced."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return torch.linspace(0, n_total - 1, n).round().long().tolist()
