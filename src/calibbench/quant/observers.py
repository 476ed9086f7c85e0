"""Range estimators: they see data (``forward``) and turn it into qparams (``calculate_qparams``).

Names follow ``QuantConfig.act_observer`` / ``weight_observer``. Every observer works on a 2-D
view ``(channels, values)``; per-tensor observers have one row. Two families:

- running: ``minmax`` (running min/max over all calibration batches, ZeroQ) and ``ema``
  (exponential moving average of the per-batch min/max, decay ``ema_decay``, MQBench style);
- estimators: ``percentile``, ``mse``, ``aciq``, applied per calibration batch and averaged over
  batches (``quant.observer_reduce=batch_mean``: bounded memory, the MQBench ``AvgMSEObserver``
  shape) or once over a bounded uniform sample of every calibration value (``pooled``: how QDrop
  and BRECQ calibrate, one search over the whole calibration forward). The two differ in how much
  the calibration set matters: an outlier image moves one batch's estimate under ``batch_mean``
  but only its share of the pool under ``pooled``.

Large batches are subsampled (seeded, so calibration is deterministic) where the estimator is
expensive: ``torch.quantile`` refuses inputs above 2^24 values and the MSE search fake-quantizes its
input ``mse_steps`` times. Observers keep no persistent state: after calibration the quantizer's
``scale``/``zero_point`` are what a checkpoint needs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import Tensor, nn

from calibbench.config import ConfigError, check_choice
from calibbench.quant.quantizer import qrange, range_to_qparams

log = logging.getLogger(__name__)

ACT_OBSERVERS = ("minmax", "ema", "percentile", "mse", "aciq")
WEIGHT_OBSERVERS = ("minmax", "mse")
OBSERVER_REDUCES = ("batch_mean", "pooled")

# Banner et al. (ACIQ): optimal Laplace clipping alpha / b per bit width, the two tables of their
# reference code (`alpha_laplace`, `alpha_laplace_positive`). One-sided (post-ReLU) data spends all
# 2^M levels on one side: the positive table, which is the two-sided one at M+1 bits but for 3
# bits (5.02 there, 5.03 two-sided at 4 bits). Before issue 20 the one-sided value came from the
# two-sided table at M+1 (5.03 at 3 bits); now it is their positive table, exactly.
ACIQ_LAPLACE_ALPHA = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}
ACIQ_LAPLACE_ALPHA_POSITIVE = {2: 3.89, 3: 5.02, 4: 6.2, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16}

PERCENTILE_MAX_VALUES = 2**20  # per row; torch.quantile's hard limit is 2^24 values in total
MSE_MAX_VALUES = 2**17  # per row: 100 candidate grids x 131k values stays ~0.1 s per batch
POOL_MAX_VALUES = 2**16  # per row, pooled estimators: a uniform sample of every calibration value


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


def _observed(value: Optional[Tensor], what: str) -> Tensor:
    """A statistic that exists once data was observed (``has_data``)."""
    if value is None:
        raise RuntimeError(f"{what}: no data observed yet (calibrate before reading the range)")
    return value


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
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def calculate_range(self) -> tuple[Tensor, Tensor]:
        return _observed(self.min_val, self.name), _observed(self.max_val, self.name)


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
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            d = self.decay
            self.min_val = d * self.min_val + (1 - d) * lo
            self.max_val = d * self.max_val + (1 - d) * hi


class _EstimatingObserver(Observer):
    """An estimator (percentile, MSE search, ACIQ) applied per batch or once over pooled values.

    ``reduce="batch_mean"``: one estimate per calibration batch, averaged over batches (bounded
    memory; what this project did before ``observer_reduce`` existed, kept bit for bit).
    ``reduce="pooled"``: one estimate over every calibration value, as the references calibrate
    (QDrop's and BRECQ's ``main_imagenet.py`` run the MSE search once, on one forward of 256 / 64
    calibration images). The pool is a uniform sample of at most ``pool_values`` values per row
    (each batch merged in with its share of all values seen, seeded) plus the exact running
    min/max, so memory stays bounded for any calibration size and the search grid starts at the
    true range. With a pool that holds every value, pooled is exactly the estimator applied to the
    concatenation of all batches.
    """

    def __init__(self, *args: Any, seed: int = 0, reduce: str = "batch_mean",
                 pool_values: int = POOL_MAX_VALUES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_choice("quant.observer_reduce", reduce, OBSERVER_REDUCES)
        if pool_values < 1:
            raise ConfigError(f"quant.pool_values={pool_values} must be >= 1")
        self.seed = seed
        self.reduce = reduce
        self.pool_values = int(pool_values)
        self.reset()

    @property
    def has_data(self) -> bool:
        return self.count > 0

    def reset(self) -> None:
        self.sum_lo: Optional[Tensor] = None
        self.sum_hi: Optional[Tensor] = None
        self.count = 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._pool: Optional[Tensor] = None  # (rows, <= pool_values) sampled values
        self._seen = 0  # values per row the pool stands for
        self._min: Optional[Tensor] = None
        self._max: Optional[Tensor] = None

    @abstractmethod
    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's ``(lo, hi)`` per row (``batch_mean``); the observer averages them."""

    @abstractmethod
    def pooled_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` per row from the pooled sample ``rows``; ``lo``/``hi`` are the exact
        extremes of every value observed (``pooled``)."""

    def observe(self, rows: Tensor) -> None:
        self.count += 1
        if self.reduce == "pooled":
            self._add_to_pool(rows)
            return
        lo, hi = self.batch_range(rows)
        if self.sum_lo is None or self.sum_hi is None:
            self.sum_lo, self.sum_hi = lo.clone(), hi.clone()
        else:
            self.sum_lo += lo
            self.sum_hi += hi

    def _add_to_pool(self, rows: Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        n, m = rows.shape[1], self.pool_values
        if self._pool is None:
            self._pool, self._seen = _subsample(rows, m, self._gen).clone(), n
            return
        total = self._seen + n
        self._seen = total
        if self._pool.shape[1] + n <= m:  # everything seen still fits: keep it all
            self._pool = torch.cat([self._pool, rows], dim=1)
            return
        # Merge so that each part keeps its share of all values seen: the pool (standing for
        # `seen` values) and the batch (n values) are subsampled to m * seen / total and
        # m * n / total. The batch side is drawn with replacement (randint is ~10x cheaper than
        # randperm on a 1M-value batch); the pool side without.
        take = max(1, min(m, round(m * n / total)))
        keep = min(self._pool.shape[1], m - take)
        old = self._pool.index_select(1, torch.randperm(self._pool.shape[1], generator=self._gen)[:keep]
                                      .to(rows.device))
        new = _subsample(rows, take, self._gen) if n > take else rows
        self._pool = torch.cat([old, new], dim=1)

    def calculate_range(self) -> tuple[Tensor, Tensor]:
        if self.reduce == "pooled":
            return self.pooled_range(_observed(self._pool, self.name), _observed(self._min, self.name),
                                     _observed(self._max, self.name))
        return _observed(self.sum_lo, self.name) / self.count, _observed(self.sum_hi, self.name) / self.count

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduce={self.reduce}"


class PercentileObserver(_EstimatingObserver):
    """The ``(100 - p)``-th and ``p``-th percentiles (per batch and averaged, or pooled)."""

    name = "percentile"

    def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"quant.percentile={percentile} must be in (50, 100]")
        self.q = float(percentile) / 100.0
        super().__init__(*args, **kwargs)

    def _quantiles(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        qs = torch.tensor([1.0 - self.q, self.q], device=rows.device)
        lo, hi = torch.quantile(rows, qs, dim=1)
        return lo, hi

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        per_row = max(1, min(PERCENTILE_MAX_VALUES, 2**24 // rows.shape[0]))
        return self._quantiles(_subsample(rows, per_row, self._gen))

    def pooled_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        p_lo, p_hi = self._quantiles(rows)
        if self.q == 1.0:  # the 100th percentile is the exact max, not the sample's
            return lo, hi
        return torch.maximum(p_lo, lo), torch.minimum(p_hi, hi)


class MSEObserver(_EstimatingObserver):
    """The clipped range minimising ``mean |x - q(x)|^p`` among ``steps`` candidates.

    Candidate ``i`` (1..steps) scales the range by ``i / steps`` towards 0: for one-sided
    (post-ReLU) data that is exactly QDrop/MQBench's 1-D search (thresholds ``range * i / 100``,
    ``p = 2.4``); for two-sided data it is BRECQ's ``scale_method='mse'`` (both ends shrunk
    together, ``p = 2.4``; BRECQ stops at 80 candidates, 1.00..0.21). A range that does not contain
    0 is shrunk towards its midpoint instead. Departure: QDrop's asymmetric two-sided search also
    enumerates every zero point per range (100 x 2^b candidates); here the zero point follows from
    the shrunk range. The search is vectorised over channels (per-channel weights pick a ratio
    per output channel). ``p`` is ``quant.mse_p``.
    """

    name = "mse"

    def __init__(self, *args: Any, steps: int = 100, p: float = 2.0, max_values: int = MSE_MAX_VALUES,
                 **kwargs: Any) -> None:
        if steps < 1:
            raise ConfigError(f"quant.mse_steps={steps} must be >= 1")
        if not p > 0:
            raise ConfigError(f"quant.mse_p={p} must be > 0")
        self.steps = int(steps)
        self.p = float(p)
        self.max_values = int(max_values)
        super().__init__(*args, **kwargs)

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = _subsample(rows, self.max_values, self._gen)
        lo, hi = torch.aminmax(rows, dim=1)
        return self.search(rows, lo, hi)

    def pooled_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return self.search(rows, lo, hi)

    def search(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """The best of the ``steps`` shrunk versions of ``[lo, hi]`` for the values ``rows``."""
        straddles = (lo <= 0) & (hi >= 0)
        centre = torch.where(straddles, torch.zeros_like(lo), (lo + hi) / 2)
        qmin, qmax = qrange(self.bits, self.symmetric)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        count = rows.shape[1]
        # Post-ReLU activations are about half exact zeros, and every zero has the same error
        # |q(0)|^p: a per-tensor search counts them once instead of quantizing each (the same sum,
        # about half the work). Per-channel rows keep their rectangular shape.
        zeros = 0
        if rows.shape[0] == 1:
            nonzero = rows[rows != 0]
            zeros = count - nonzero.numel()
            rows = nonzero[None]
        work = torch.empty_like(rows)
        for i in range(self.steps, 0, -1):  # full range first: ties keep the widest range
            r = i / self.steps
            c_lo, c_hi = centre + r * (lo - centre), centre + r * (hi - centre)
            scale, zp = range_to_qparams(c_lo, c_hi, self.bits, self.symmetric, self.include_zero)
            scale, zp = scale[:, None], zp.float()[:, None]
            # q(x) - x, in place in one buffer: the search is most of the estimator's cost
            torch.div(rows, scale, out=work)
            work.round_()
            torch.clamp(work, qmin - zp, qmax - zp, out=work)
            work.mul_(scale).sub_(rows)
            err = (work.pow_(2) if self.p == 2.0 else work.abs_().pow_(self.p)).sum(dim=1)
            if zeros:
                q0 = torch.clamp(torch.zeros_like(zp), qmin - zp, qmax - zp).mul_(scale)
                err = err + zeros * q0.abs_().pow_(self.p)[:, 0]
            err = err / count
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


class ACIQObserver(_EstimatingObserver):
    """Analytic Laplace clipping (Banner et al., ACIQ), per batch and averaged, or pooled.

    ``b = mean|x - mean(x)|``, ``alpha = b * ACIQ_LAPLACE_ALPHA[bits]``. Two-sided data: the window
    ``[max(min, mean - alpha), lo + 2 alpha]`` clipped to the observed max. One-sided data
    (observed min >= 0, e.g. after ReLU): all levels lie on one side, so alpha comes from Banner's
    positive table (``ACIQ_LAPLACE_ALPHA_POSITIVE``) and the window is
    ``[min, max(mean, 0) + alpha]`` clipped to the observed max
    (Banner's reference code does the same). Above 8 bits the table ends: plain min/max.
    """

    name = "aciq"

    def batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = torch.aminmax(rows, dim=1)
        return self._window(rows, lo, hi)

    def pooled_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return self._window(rows, lo, hi)

    def _window(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        if self.bits > 8:
            return lo, hi
        mean = rows.mean(dim=1)
        b = (rows - mean[:, None]).abs_().mean(dim=1)
        one_sided = lo >= 0
        alpha = torch.where(one_sided, b * ACIQ_LAPLACE_ALPHA_POSITIVE[self.bits],
                            b * ACIQ_LAPLACE_ALPHA[self.bits])
        two_lo = torch.maximum(lo, mean - alpha)
        two_hi = torch.minimum(hi, two_lo + 2 * alpha)
        one_hi = torch.minimum(hi, mean.clamp(min=0) + alpha)
        return torch.where(one_sided, lo, two_lo), torch.where(one_sided, one_hi, two_hi)


def build_observer(name: str, bits: int, symmetric: bool = False, ch_axis: Optional[int] = None,
                   include_zero: bool = True, *, ema_decay: float = 0.9,
                   percentile: float = 99.99, mse_steps: int = 100, mse_p: float = 2.0,
                   reduce: str = "batch_mean", pool_values: int = POOL_MAX_VALUES,
                   valid: tuple[str, ...] = ACT_OBSERVERS, what: str = "quant.act_observer"
                   ) -> Observer:
    """The observer called ``name``; an unknown name is a ConfigError listing ``valid``.
    ``reduce`` (batch_mean | pooled) applies to the estimating observers (percentile, mse, aciq);
    minmax and ema are running statistics and pool by construction."""
    check_choice(what, name, valid)
    check_choice("quant.observer_reduce", reduce, OBSERVER_REDUCES)
    common = (bits, symmetric, ch_axis, include_zero)  # Observer's positional parameters
    if name == "minmax":
        return MinMaxObserver(*common)
    if name == "ema":
        return EMAMinMaxObserver(*common, decay=ema_decay)
    if name == "percentile":
        return PercentileObserver(*common, percentile=percentile, reduce=reduce, pool_values=pool_values)
    if name == "mse":
        return MSEObserver(*common, steps=mse_steps, p=mse_p, reduce=reduce, pool_values=pool_values)
    return ACIQObserver(*common, reduce=reduce, pool_values=pool_values)
