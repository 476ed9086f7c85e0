"""Datasets: the train split feeds calibration, the test split is what tables report.

A validation split (``dataset.val_size`` images, drawn with ``dataset.val_seed`` from the train
split) is held out of every calibration and selection pool: defaults and hyperparameters are
chosen on it (``eval_split=val``), never on the test split. Its draw does not depend on the run
seed, so every run and strategy sees the same validation images and the same pool.

Both splits use deterministic eval transforms (no augmentation): a calibration image is the same
tensor every time it is drawn, which keeps selection and caching reproducible.

Folder datasets (``imagenet``, ``cifar10_jpeg``) are checked for their layout before any work
(``train/`` and the evaluation folder exist and hold the same class folders, as many as the
config says). ``dataset.train_per_class=N`` keeps a seeded sample of N files per class folder of
the train split (the draw is seeded by ``dataset.val_seed``, like the validation split: fixed per
dataset, independent of the run seed): each class folder's file names are read once (no file is
opened), and the dataset, its pool and every selection pass hold only the sample.

Files are decoded lazily, where a batch is read. A file that does not decode raises
:class:`CorruptImageError` naming it; consumers of the calibration pool read with
``skip_corrupt=True`` (``loader``, :meth:`DataModule.load_valid`, :meth:`DataModule.fill`) and drop
such files with one warning that counts them, while evaluation and :meth:`DataModule.load` stay
strict: the evaluation set never silently shrinks.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import random
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
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
FOLDER_DATASETS = ("cifar10_jpeg", "imagenet")
CORRUPT_LABEL = -1  # what a skip_corrupt loader yields as the label of a file that does not decode
_CORRUPT_PREFIX = "corrupt or unreadable image file"


class CorruptImageError(ConfigError):
    """An image file that PIL cannot decode; the message names the file.

    A ConfigError (bad input, exit code 2 from the CLI). Constructed from one message string, so a
    DataLoader worker can re-raise it in the main process with its type.
    """


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a file that does not decode is a :class:`CorruptImageError`.

    ``convert`` forces the full decode: a truncated JPEG opens (its header is fine) and fails only
    there. Module-level so DataLoader workers can pickle it.
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise CorruptImageError(f"{_CORRUPT_PREFIX} {path!r}: {err}") from None


def corrupt_message(err: BaseException) -> str:
    """The ``corrupt or unreadable image file '<path>': <reason>`` part of ``err``'s message
    (a DataLoader worker's re-raise wraps it in a traceback)."""
    text = str(err)
    start = text.rfind(_CORRUPT_PREFIX)
    return text[start:].strip() if start >= 0 else text.strip()


def dataset_len(dataset: Dataset) -> int:
    """``len(dataset)``: torch's Dataset declares no ``__len__``, every split used here has one."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} is not a map-style dataset with a length")
    return len(dataset)


class MarkCorrupt(Dataset):
    """``dataset`` whose undecodable items come out as ``(zeros, CORRUPT_LABEL)`` instead of
    raising, so a streaming consumer of the calibration pool can drop them batch by batch."""

    def __init__(self, dataset: Dataset, shape: tuple[int, ...]) -> None:
        self.dataset, self.shape = dataset, shape

    def __len__(self) -> int:
        return dataset_len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except CorruptImageError:
            return torch.zeros(self.shape), CORRUPT_LABEL


_LISTINGS: dict[tuple, tuple[tuple, list[tuple[str, int]]]] = {}  # SampledImageFolder.make_dataset's per-process memo


class SampledImageFolder(tvd.ImageFolder):
    """ImageFolder with :func:`load_rgb`, optionally keeping a seeded sample of ``per_class`` files
    per class folder (``dataset.train_per_class``).

    Each class folder is listed once (one ``scandir``) and no file is opened; the sample of class
    ``wnid`` is seeded by (``seed``, ``wnid``), so it does not depend on which other classes exist.
    A class with fewer files keeps them all (logged).
    """

    def __init__(self, root: str, transform: Any, per_class: Optional[int] = None, seed: int = 0) -> None:
        self.per_class, self.sample_seed = per_class, seed
        super().__init__(root, transform=transform, loader=load_rgb)

    def make_dataset(self, directory: str, class_to_idx: dict[str, int],  # torchvision's signature
                     extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """The listing, read once per process while the folders are unchanged: a sweep or a test
        session builds the same split many times, and listing 60,000 CIFAR files costs ~0.4 s
        (1.28M ImageNet files far more). Adding, removing or renaming a file changes its class
        folder's mtime, which invalidates the entry; files changed in place do not alter a
        listing (the cache keys' :func:`split_fingerprint` stats those)."""
        if is_valid_file is not None:
            return self._list(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        key = (os.path.abspath(directory), tuple(sorted(class_to_idx.items())),
               tuple(extensions) if extensions else None, allow_empty, self.per_class, self.sample_seed)
        stamp = tuple(os.stat(os.path.join(directory, wnid)).st_mtime_ns for wnid in sorted(class_to_idx))
        hit = _LISTINGS.get(key)
        if hit is None or hit[0] != stamp:
            hit = _LISTINGS[key] = (stamp, self._list(directory, class_to_idx, extensions, None, allow_empty))
        return list(hit[1])

    def _list(self, directory: str, class_to_idx: dict[str, int], extensions: Optional[tuple[str, ...]],
              is_valid_file: Optional[Callable[[str], bool]], allow_empty: bool) -> list[tuple[str, int]]:
        if self.per_class is None:
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        exts = tuple(e.lower() for e in (extensions or tvd.folder.IMG_EXTENSIONS))
        samples, short = [], []
        for wnid, label in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            folder = os.path.join(directory, wnid)
            names = sorted(e.name for e in os.scandir(folder)
                           if e.is_file() and e.name.lower().endswith(exts))
            if not names:
                raise ConfigError(f"class folder {folder!r} holds no image files ({', '.join(exts)})")
            if len(names) > self.per_class:
                digest = hashlib.sha256(f"{int(self.sample_seed)}/train_per_class/{wnid}".encode()).digest()
                names = sorted(random.Random(int.from_bytes(digest[:8], "little")).sample(names, self.per_class))
            else:
                short.append(wnid)
            samples += [(os.path.join(folder, n), label) for n in names]
        if short:
            log.info("train_per_class=%d: %d class folders hold fewer files and are kept whole (%s...)",
                     self.per_class, len(short), short[:3])
        return samples


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
    transform: str = ""  # the eval transform applied to every image, for the result record
    pool: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        keep = torch.ones(dataset_len(self.train), dtype=torch.bool)
        keep[torch.tensor(self.holdout, dtype=torch.long)] = False
        self.pool = keep.nonzero().flatten()

    def eval_set(self, split: str = "test", limit: Optional[int] = None) -> tuple[Dataset, list[int]]:
        """(dataset, indices) to evaluate on: the test split, or the validation split carved from
        train; ``limit`` keeps that many indices spread evenly (class-sorted folders stay balanced)."""
        if split == "test":
            return self.test, spread_indices(dataset_len(self.test), limit)
        if split != "val":
            raise ConfigError(f"unknown eval_split {split!r}; valid choices: {', '.join(EVAL_SPLITS)}")
        if not self.holdout:
            raise ConfigError("eval_split=val needs a validation split: set dataset.val_size > 0")
        return self.train, [self.holdout[i] for i in spread_indices(len(self.holdout), limit)]

    def loader(self, dataset: Dataset, batch_size: int, indices: Optional[Sequence[int]] = None,
               num_workers: Optional[int] = None, skip_corrupt: bool = False) -> DataLoader:
        """A streaming, ordered loader over ``dataset`` (optionally a subset of it).

        ``skip_corrupt``: a file that does not decode comes out with label ``CORRUPT_LABEL`` (and
        zero pixels) for the consumer to drop; otherwise it raises :class:`CorruptImageError`.
        """
        if skip_corrupt:
            dataset = MarkCorrupt(dataset, (len(self.mean), self.input_size, self.input_size))
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
        """Stack the images and labels at ``indices`` (calibration-sized sets only). Strict: a
        file that does not decode raises :class:`CorruptImageError` naming it."""
        images, labels, _, _ = self._load(indices, split, batch_size, skip_corrupt=False)
        return images, labels

    def load_valid(self, indices: Sequence[int], split: str = "train", batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """(images, labels, kept indices, skipped indices): like :meth:`load`, but files that do
        not decode are dropped with one warning that counts them."""
        images, labels, kept, skipped = self._load(indices, split, batch_size, skip_corrupt=True)
        warn_skipped(self, skipped, split)
        return images, labels, kept, skipped

    def fill(self, candidates: Sequence[Sequence[int]], counts: Sequence[int], batch_size: int = 256
             ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """The first ``counts[g]`` train images of each candidate list ``candidates[g]`` that
        decode: a corrupt file is replaced by the next candidate of its list. Returns (images,
        labels, indices, skipped) with images and labels in ascending index order. Reads
        ``sum(counts)`` files plus one per corrupt one; a list that runs out is a ConfigError."""
        group: dict[int, int] = {}
        taken = [int(k) for k in counts]
        want: list[int] = []
        for g, (cands, k) in enumerate(zip(candidates, taken)):
            head = [int(i) for i in cands[:k]]
            if len(head) < k:
                raise ConfigError(f"{k} images requested from a list of {len(cands)} candidates")
            want += head
            group.update({i: g for i in head})
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        skipped: list[int] = []
        while want:
            images, labels, kept, bad = self._load(want, "train", batch_size, skip_corrupt=True)
            got.update({i: (images[j], labels[j]) for j, i in enumerate(kept)})
            skipped += bad
            want = []
            for i in bad:
                g = group[i]
                if taken[g] >= len(candidates[g]):
                    raise ConfigError(
                        f"not enough decodable images: {len(skipped)} corrupt file(s) among the "
                        f"candidates (first: {self.file_of(skipped[0])!r}) and no candidate left "
                        f"to replace them")
                nxt = int(candidates[g][taken[g]])
                taken[g] += 1
                group[nxt] = g
                want.append(nxt)
        warn_skipped(self, skipped, "train")
        chosen = sorted(got)
        if not chosen:
            return torch.empty(0), torch.empty(0, dtype=torch.long), [], skipped
        return (torch.stack([got[i][0] for i in chosen]), torch.stack([got[i][1] for i in chosen]),
                chosen, skipped)

    def _load(self, indices: Sequence[int], split: str, batch_size: int, skip_corrupt: bool
              ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        dataset = self.train if split == "train" else self.test
        indices = [int(i) for i in indices]
        xs, ys = [], []
        workers = 0 if len(indices) <= batch_size else None
        for x, y in self.loader(dataset, batch_size, indices, num_workers=workers, skip_corrupt=skip_corrupt):
            xs.append(x)
            ys.append(torch.as_tensor(y))
        if not xs:
            return torch.empty(0), torch.empty(0, dtype=torch.long), [], []
        images, labels = torch.cat(xs), torch.cat(ys)
        ok = labels != CORRUPT_LABEL
        if bool(ok.all()):
            return images, labels, indices, []
        kept = [i for i, good in zip(indices, ok.tolist()) if good]
        bad = [i for i, good in zip(indices, ok.tolist()) if not good]
        return images[ok], labels[ok], kept, bad

    def file_of(self, index: int, split: str = "train") -> str:
        """The file behind ``index`` of a folder dataset (for messages), else ``split[index]``."""
        dataset = self.train if split == "train" else self.test
        samples = getattr(dataset, "samples", None)
        return samples[int(index)][0] if samples is not None else f"{split}[{int(index)}]"

    def targets(self, split: str = "train") -> list[int]:
        """Labels without decoding images (ImageFolder and torchvision CIFAR both keep them)."""
        dataset = self.train if split == "train" else self.test
        # ImageFolder's and torchvision CIFAR's attribute; torch's Dataset does not declare it
        return list(dataset.targets)  # type: ignore[attr-defined]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] RGB pixels to the model's input space."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


def warn_skipped(data: DataModule, skipped: Sequence[int], split: str = "train",
                 what: str = "the calibration pool") -> None:
    """One warning counting the corrupt files dropped from ``what`` (the first few named)."""
    if skipped:
        files = [data.file_of(i, split) for i in list(skipped)[:3]]
        log.warning("skipped %d corrupt image file(s) in %s (they do not decode): %s%s",
                    len(skipped), what, ", ".join(files), " ..." if len(skipped) > 3 else "")


def split_fingerprint(dataset: Dataset, indices: Sequence[int]) -> Optional[str]:
    """A cheap digest of the files behind ``indices`` of ``dataset``: each file's path, size and
    modification time (one ``stat`` per file, nothing opened; ~0.1 s for 10,000 files here).

    Cache keys carry it, so images changed in place (same paths, new bytes) invalidate the FP
    metrics and calibration sets computed from the old ones. Folder datasets stat the selected
    image files; torchvision's CIFAR stats its batch files; an in-memory dataset has none (None)."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        paths = [samples[int(i)][0] for i in indices]
    elif getattr(dataset, "base_folder", None) and getattr(dataset, "root", None):
        # torchvision CIFAR's attributes (checked just above); torch's Dataset does not declare them
        files = dataset.train_list if getattr(dataset, "train", False) else dataset.test_list  # type: ignore[attr-defined]
        paths = [os.path.join(dataset.root, dataset.base_folder, name) for name, _ in files]  # type: ignore[attr-defined]
    else:
        return None
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:24]


def _normalization(cfg: DatasetConfig, model: ModelConfig) -> tuple[tuple, tuple]:
    if cfg.normalization == "legacy_gdfq":
        return LEGACY_GDFQ[FAMILY[cfg.name]]
    return tuple(model.mean), tuple(model.std)


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
    if cfg.train_per_class is not None:
        if cfg.train_per_class < 1:
            raise ConfigError(f"dataset.train_per_class={cfg.train_per_class} must be >= 1 or null")
        if cfg.name not in FOLDER_DATASETS:
            raise ConfigError(f"dataset.train_per_class applies to folder datasets "
                              f"({', '.join(FOLDER_DATASETS)}), not {cfg.name!r}; set it to null")
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
    elif cfg.name in FOLDER_DATASETS:
        val_name = "test" if cfg.name == "cifar10_jpeg" else "val"
        check_layout(root, cfg, val_name)
        try:
            train = SampledImageFolder(str(root / "train"), tf, cfg.train_per_class, cfg.val_seed)
            val = SampledImageFolder(str(root / val_name), tf)
        except FileNotFoundError as err:  # torchvision: a class folder without image files
            raise ConfigError(f"dataset {cfg.name!r} at {str(root)!r}: {err}") from err
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
    return DataModule(cfg.name, train, val, cfg.num_classes, size, mean, std, cfg.num_workers, holdout,
                      transform=" -> ".join(repr(t) for t in tf.transforms))


def _class_folders(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def check_layout(root: Path, cfg: DatasetConfig, val_name: str) -> None:
    """A folder dataset's layout, before any work: ``root/train/<class>/`` and
    ``root/<val_name>/<class>/`` with the same class folders, ``cfg.num_classes`` of them.
    One ConfigError naming the path and what is missing."""
    _require_dir(root, cfg)
    layout = f"expected root/train/<class>/*.JPEG and root/{val_name}/<class>/*.JPEG"
    missing = [split for split in ("train", val_name) if not (root / split).is_dir()]
    if missing:
        raise ConfigError(f"dataset {cfg.name!r} at {str(root)!r}: no {' or '.join(m + '/' for m in missing)} "
                          f"folder ({layout}); found: {', '.join(sorted(os.listdir(root))) or 'nothing'}")
    train, val = _class_folders(root / "train"), _class_folders(root / val_name)
    if set(train) != set(val):
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ConfigError(
            f"dataset {cfg.name!r} at {str(root)!r}: the class folders of train/ and {val_name}/ "
            f"differ ({len(train)} vs {len(val)}): {len(only_train)} only in train/ {only_train[:3]}, "
            f"{len(only_val)} only in {val_name}/ {only_val[:3]}; labels are folder positions, so "
            f"both splits need the same class folders")
    if len(train) != cfg.num_classes:
        raise ConfigError(
            f"dataset {cfg.name!r} at {str(root)!r} has {len(train)} class folders in train/ and "
            f"{val_name}/, the config (and the model) expect {cfg.num_classes} ({layout})")


def spread_indices(n_total: int, n: Optional[int]) -> list[int]:
    """``n`` indices spread evenly over ``range(n_total)``: class-sorted folders stay balanced."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return torch.linspace(0, n_total - 1, n).round().long().tolist()
