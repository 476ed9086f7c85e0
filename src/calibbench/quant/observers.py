"""Range estimators: they see data (``forward``) and turn it into qparams (``calculate_qparams``).

Names follow ``QuantConfig.act_observer`` / ``weight_observer``. Every observer works on a 2-D
view ``(channels, values)``; per-tensor observers have one row. Two families:

- running: ``minmax`` (running min/max over all calibration batches, ZeroQ) and ``ema``
  (exponential moving average of the per-batch min/max, decay ``ema_decay``, MQBench style);
- per-batch estimate averaged over batches: ``percentile``, ``mse``, ``aciq``. Averaging (rather
  than pooling all values) keeps memory bounded and is how MQBench/BRECQ-style tools calibrate.

Large batches are subsampled (seeded, so calibration is deterministic) where the estimator is
expensive: ``torch.quantile`` refuses inputs above 2^24 values and the MSE search fake-quantizes its
input ``mse_steps`` times. Observers keep no persistent state: after calibration the quantizer's
``scale``/``zero_point`` are what a checkpoint needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from calibbench.config import ConfigError, check_choice
from calibbench.quant.quantizer import qrange, range_to_qparams

log = logging.getLogger(__name__)

ACT_OBSERVERS = ("minmax", "ema", "percentile", "mse", "aciq")
WEIGHT_OBSERVERS = ("minmax", "mse")

# Banner et al. (ACIQ): optimal Laplace clipping alpha / b for a two-sided distribution, per bit
# width. One-sided (post-ReLU) data spends all 2^M levels on one side, which is the two-sided
# optimum at M+1 bits: their code's `alpha_laplace_positive[M]` == `alpha_laplace[M+1]`; 9 bits
# (= one-sided 8-bit) is 11.16.
ACIQ_LAPLACE_ALPHA = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89, 9: 11.16}

PERCENTILE_MAX_VALUES = 2**20  # per row; torch.quantile's hard limit is 2^24 values in total
MSE_MAX_VALUES = 2**17  # per row: 100 candidate grids x 131k values stays ~0.1 s per batch


def _rows(x: Tensor, ch_axis: Optional[int]) -> Tensor:
    """``(channels, values)`` float view of ``x`` (one row for per-tensor)."""
    x = x.detach()
    if ch_axis is None:
        return x.reshape(1, -1).float()
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1).float()


def _subsample(rows: Tensor, max_values: int, generator: torch.Generator) -> Tensor:
    """At most ``max_values`` values per row, drawn uniformly (same columns for every row)."""
    n = rows.shape[1]
    if n <= max_values:
        return rows
    idx = torch.randint(n, (max_values,), generator=generator).to(rows.device)
    return rows.index_select(1, idx)


class Observer(nn.Module, ABC):
    """Base: sees tensors, knows the target grid, returns ``(scale, zero_point)``."""

    name = "base"

    def __init__(self, bits: int, symmetric: bool = False, ch_axis: Optional[int] = None,
                 include_zero: bool = True) -> None:
        super().__init__()
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.ch_axis = ch_axis
        self.include_zero = bool(include_zero)

    @property
    @abstractmethod
    def has_data(self) -> bool:
        """True once any data was observed."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything seen (a new calibration starts from scratch)."""

    @abstractmethod
    def observe(self, rows: Tensor) -> None:
        """Fold one batch (one row per channel, or a single row) into the estimate."""

    @abstractmethod
    def calculate_range(self) -> tuple[Tensor, Tensor]:
        """The estimated ``(lo, hi)``: one value per row."""

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel():
            self.observe(_rows(x, self.ch_axis))
        return x

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.calculate_range()
        return range_to_qparams(lo, hi, self.bits, self.symmetric, self.include_zero)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, ch_axis={self.ch_axis}"


class MinMaxObserver(Observer):
    """Running min/max over every value seen: ZeroQ's activation ranges, min/max weight ranges."""

    name = "minmax"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def reset(self) -> None:
        self.min_val = self.max_val = None

    def observe(self, rows: Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def calculate_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val


class EMAMinMaxObserver(MinMaxObserver):
    """``range <- decay * range + (1 - decay) * batch range``; the first batch initialises it."""

    name = "ema"

    def __init__(self, *args: Any, decay: float = 0.9, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"quant.ema_decay={decay} must be in [0, 1)")
        self.decay = float(decay)

    def observe(self, rows: Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            d = self.decay
            self.min_val = d * self.min_val + (1 - d) * lo
            self.max_val = d * self.max_val + (1 - d) * hi


class _AveragedObserver(Observer):
    """Estimates a range per batch and averages the estimates over batches."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.reset()

    @property
    def has_data(self) -> bool:
        return self.count > 0

    def reset(self) -> None:
        self.sum_lo: Optional[Tensor] = None
        self.sum_hi: Optional[Tensor] = None
        self.count = 0
        self._gen = torch.Generator().manual_seed(self.seed)

    @abstractmethod
    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's ``(lo, hi)`` per row; the observer averages them over batches."""

    def observe(self, rows: Tensor) -> None:
        lo, hi = self.batch_range(rows)
        if self.sum_lo is None:
            self.sum_lo, self.sum_hi = lo.clone(), hi.clone()
        else:
            self.sum_lo += lo
            self.sum_hi += hi
        self.count += 1

    def calculate_range(self) -> tuple[Tensor, Tensor]:
        return self.sum_lo / self.count, self.sum_hi / self.count


class PercentileObserver(_AveragedObserver):
    """Per-batch ``(100 - p)``-th and ``p``-th percentiles, averaged over batches."""

    name = "percentile"

    def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"quant.percentile={percentile} must be in (50, 100]")
        self.q = float(percentile) / 100.0
        super().__init__(*args, **kwargs)

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        per_row = max(1, min(PERCENTILE_MAX_VALUES, 2**24 // rows.shape[0]))
        rows = _subsample(rows, per_row, self._gen)
        qs = torch.tensor([1.0 - self.q, self.q], device=rows.device)
        lo, hi = torch.quantile(rows, qs, dim=1)
        return lo, hi


class MSEObserver(_AveragedObserver):
    """Per batch, the clipped range minimising ``||x - q(x)||^2`` among ``steps`` candidates.

    Candidate ``i`` (1..steps) scales the batch range by ``i / steps`` towards 0 (BRECQ/MQBench);
    a range that does not contain 0 is shrunk towards its midpoint instead. The search is
    vectorised over channels, so per-channel weights pick a ratio per output channel.
    """

    name = "mse"

    def __init__(self, *args: Any, steps: int = 100, max_values: int = MSE_MAX_VALUES,
                 **kwargs: Any) -> None:
        if steps < 1:
            raise ConfigError(f"quant.mse_steps={steps} must be >= 1")
        self.steps = int(steps)
        self.max_values = int(max_values)
        super().__init__(*args, **kwargs)

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = _subsample(rows, self.max_values, self._gen)
        lo, hi = torch.aminmax(rows, dim=1)
        straddles = (lo <= 0) & (hi >= 0)
        centre = torch.where(straddles, torch.zeros_like(lo), (lo + hi) / 2)
        qmin, qmax = qrange(self.bits, self.symmetric)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.steps, 0, -1):  # full range first: ties keep the widest range
            r = i / self.steps
            c_lo, c_hi = centre + r * (lo - centre), centre + r * (hi - centre)
            scale, zp = range_to_qparams(c_lo, c_hi, self.bits, self.symmetric, self.include_zero)
            scale, zp = scale[:, None], zp.float()[:, None]
            q = torch.clamp(torch.round(rows / scale), qmin - zp, qmax - zp) * scale
            err = (q - rows).pow_(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


class ACIQObserver(_AveragedObserver):
    """Analytic Laplace clipping (Banner et al., ACIQ), per batch, averaged over batches.

    ``b = mean|x - mean(x)|``, ``alpha = b * ACIQ_LAPLACE_ALPHA[bits]``. Two-sided data: the window
    ``[max(min, mean - alpha), lo + 2 alpha]`` clipped to the observed max. One-sided data
    (observed min >= 0, e.g. after ReLU): all levels lie on one side, so alpha is taken at
    ``bits + 1`` and the window is ``[min, max(mean, 0) + alpha]`` clipped to the observed max
    (Banner's reference code does the same). Above 8 bits the table ends: plain min/max.
    """

    name = "aciq"

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = torch.aminmax(rows, dim=1)
        if self.bits > 8:
            return lo, hi
        mean = rows.mean(dim=1)
        b = (rows - mean[:, None]).abs_().mean(dim=1)
        one_sided = lo >= 0
        alpha = torch.where(one_sided, b * ACIQ_LAPLACE_ALPHA[self.bits + 1],
                            b * ACIQ_LAPLACE_ALPHA[self.bits])
        two_lo = torch.maximum(lo, mean - alpha)
        two_hi = torch.minimum(hi, two_lo + 2 * alpha)
        one_hi = torch.minimum(hi, mean.clamp(min=0) + alpha)
        return torch.where(one_sided, lo, two_lo), torch.where(one_sided, one_hi, two_hi)


def build_observer(name: str, bits: int, symmetric: bool = False, ch_axis: Optional[int] = None,
                   include_zero: bool = True, *, ema_decay: float = 0.9,
                   percentile: float = 99.99, mse_steps: int = 100,
                   valid: tuple[str, ...] = ACT_OBSERVERS, what: str = "quant.act_observer"
                   ) -> Observer:
    """The observer called ``name``; an unknown name is a ConfigError listing ``valid``."""
    check_choice(what, name, valid)
    common = dict(bits=bits, symmetric=symmetric, ch_axis=ch_axis, include_zero=include_zero)
    if name == "minmax":
        return MinMaxObserver(**common)
    if name == "ema":
        return EMAMinMaxObserver(**common, decay=ema_decay)
    if name == "percentile":
        return PercentileObserver(**common, percentile=percentile)
    if name == "mse":
        return MSEObserver(**common, steps=mse_steps)
    return ACIQObserver(**common)
