"""Top-1/top-5 accuracy, streamed batch by batch: only running counts are kept."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from calibbench.datasets import CorruptImageError, DataModule, corrupt_message


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels.view(-1, 1)
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def evaluate(model: nn.Module, data: DataModule, device: torch.device, batch_size: int = 256,
             indices: Optional[Sequence[int]] = None, progress: bool = False,
             desc: str = "eval", dataset: Optional[Dataset] = None) -> dict[str, float]:
    """Accuracy in percent of ``model`` on ``dataset`` (default: the test split), or the
    ``indices`` of it. ``DataModule.eval_set`` gives (dataset, indices) for ``eval_split``."""
    model.eval()
    loader = data.loader(data.test if dataset is None else dataset, batch_size, indices)
    correct1 = correct5 = seen = 0
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                c1, c5 = topk_correct(model(images), labels)
                correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + len(labels)
    except CorruptImageError as err:  # never skipped: the evaluation set does not shrink silently
        raise CorruptImageError(f"{desc}: the evaluation split holds a {corrupt_message(err)}; "
                                f"replace or remove that file (evaluation never skips images)") from None
    if seen == 0:
        raise ValueError("evaluation split is empty")
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "n": seen}
