"""Is a gap real? Paired bootstrap intervals against ``random``, and where a strategy lands in the
distribution of many random calibration sets.

Pairs share the seed: with the same seed, a strategy and ``random`` draw from the same pool and
the same evaluation images, so the per-seed difference removes what the seed does to both.
The bootstrap resamples those per-seed differences (a pair stays together), which is
``scipy.stats.bootstrap`` on one sample of differences with the mean as statistic.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

N_RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0  # the bootstrap's own seed: a rebuilt summary prints the same interval
MIN_PAIRS = 2
NEEDS_PAIRS = f"the interval needs ≥ {MIN_PAIRS} paired seeds"


@dataclass(frozen=True)
class PairedDiff:
    """Mean per-seed difference (strategy − reference) and its bootstrap interval."""

    mean: float
    n: int  # paired seeds
    low: Optional[float] = None  # None: fewer than MIN_PAIRS pairs
    high: Optional[float] = None
    method: str = ""  # BCa | percentile (BCa undefined) | constant (every difference equal)

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        """``+2.10 [0.40, 3.80] *`` (``*``: the interval excludes 0) or the mean with the reason."""
        if not self.has_interval:
            return f"{self.mean:+.2f} ({self.n} pair{'s' if self.n != 1 else ''}; {NEEDS_PAIRS})"
        star = " *" if self.excludes_zero else ""
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]{star}"


def paired_bootstrap(diffs: Sequence[float], n_resamples: int = N_RESAMPLES,
                     confidence: float = CONFIDENCE, seed: int = SEED) -> PairedDiff:
    """95% bootstrap CI of the mean of per-seed paired differences (seeded, BCa).

    Degenerate data is handled before scipy sees it: with every difference equal the bootstrap
    distribution is a point, BCa's acceleration is 0/0 (scipy warns and returns NaN), and the
    interval is that point exactly. If BCa is still undefined (e.g. two pairs with a skewed
    jackknife), the percentile interval is used and named in ``method``.
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or not np.all(np.isfinite(d)):
        raise ValueError(f"paired differences must be a finite 1-d sequence, got {diffs!r}")
    if len(d) == 0:
        raise ValueError("no paired seeds: nothing to compare")
    mean = float(d.mean())
    if len(d) < MIN_PAIRS:
        return PairedDiff(mean, len(d))
    if np.ptp(d) == 0.0:
        return PairedDiff(mean, len(d), mean, mean, "constant")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                  method=method, rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return PairedDiff(mean, len(d), low, high, method)
    raise RuntimeError(f"bootstrap interval undefined for differences {d.tolist()}")  # pragma: no cover


def paired_to_reference(values: dict, reference: dict, **kwargs) -> Optional[PairedDiff]:
    """Pair ``values`` and ``reference`` (seed → top-1) on shared seeds; None when none is shared."""
    shared = sorted(set(values) & set(reference), key=str)
    if not shared:
        return None
    return paired_bootstrap([values[s] - reference[s] for s in shared], **kwargs)


def percentile_within(reference: Sequence[float], value: float) -> float:
    """Percent of ``reference`` below ``value`` (ties count half): where a strategy lands among
    random calibration sets."""
    return float(stats.percentileofscore(np.asarray(reference, dtype=float), value, kind="mean"))
