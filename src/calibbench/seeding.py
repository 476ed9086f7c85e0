"""Named random streams: every consumer of randomness (a strategy's pool draw, a refiner's batch
order, a dropout mask) seeds its own generator from (run seed, stream name), so adding a stream
never shifts another's numbers. Below the stages: strategies and refiners both use it."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed from (run seed, stream name): sha256, so streams are independent."""
    digest = hashlib.sha256(f"{int(seed)}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (code that does not take a named stream)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
