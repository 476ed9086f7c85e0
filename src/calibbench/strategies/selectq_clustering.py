"""SelectQ's dynamic clustering, as pure functions of tensors (tested on hand-made numbers in
tests/test_selectq.py): the flat statistics layout, the Knowledge Distance, nearest-centroid
assignment, the annealed centroid updates (eq. 4-6) and the ranking. ``strategies/selectq.py``
holds the hooks that collect the statistics and the strategy that drives these functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from calibbench.config import ConfigError, check_choice

UPDATE_RULES = ("toward_mean", "literal")
ANNEAL_T_MAX = ("last_step", "num_steps")
SELECT = ("lowest", "highest")
_CHUNK_ELEMENTS = 1 << 24  # distance tensors are computed in chunks of at most this many floats
SHIFT_WINDOWS = 50  # info["centroid_shift"]: net centroid movement over this many windows of steps


# ----------------------------------------------------------------------------------------------
# Statistics: flat layout
#
# An image's statistics are one vector of F floats: the μ entries of all layers, then the σ
# entries in the same order (F = 2 × Σ_l c_l, c_l = 1 in layer mode, the channel count in channel
# mode). The K centroids of every layer live in one (K, F) tensor: row j holds centroid j of each
# layer. ``segment`` maps each entry to its layer, ``weight`` is 1 for μ and γ for σ entries. This
# keeps the per-batch clustering work to a handful of tensor ops whatever the number of layers.


@dataclass
class StatsLayout:
    """Which layer each entry of a statistics vector belongs to, and its distance weight."""

    names: list[str]  # one per hooked output, in execution order
    channels: list[int]  # entries per layer in the μ half (1 in layer mode)
    segment: torch.Tensor  # (F,) long: layer of each entry
    weight: torch.Tensor  # (F,) float: 1 for μ entries, γ for σ entries

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def scalar(self) -> bool:
        """Layer mode: one μ and one σ entry per layer (distances need no per-layer sum)."""
        return all(c == 1 for c in self.channels)

    @property
    def half(self) -> int:
        """Number of μ entries (the σ entries follow)."""
        return int(sum(self.channels))

    @classmethod
    def build(cls, names: Sequence[str], channels: Sequence[int], gamma: float) -> "StatsLayout":
        seg = torch.repeat_interleave(torch.arange(len(channels)), torch.tensor(list(channels)))
        half = int(seg.numel())
        weight = torch.cat([torch.ones(half), torch.full((half,), float(gamma))])
        return cls(list(names), list(channels), torch.cat([seg, seg]), weight)

    def to(self, device: torch.device) -> "StatsLayout":
        return StatsLayout(self.names, self.channels, self.segment.to(device), self.weight.to(device))


# ----------------------------------------------------------------------------------------------
# The clustering maths: pure functions of tensors, tested on hand-made numbers.


def lambda_schedule(num_steps: int, lambda_max: float, lambda_min: float,
                    t_max: str = "last_step") -> list[float]:
    """λ_t = λ_min + ½(λ_max − λ_min)(1 + cos(π t / t_max)) for t = 0 … num_steps − 1 (eq. 4)."""
    check_choice("strategy.anneal_t_max", t_max, ANNEAL_T_MAX)
    if num_steps < 1:
        return []
    denominator = num_steps - 1 if t_max == "last_step" else num_steps
    if denominator == 0:  # one step: t / t_max := 0
        return [float(lambda_max)]
    return [lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos(math.pi * t / denominator))
            for t in range(num_steps)]


def knowledge_distance(stats: torch.Tensor, centroids: torch.Tensor, layout: StatsLayout
                       ) -> torch.Tensor:
    """D[b, k, l] = Σ_{μ entries of l} (μ_C − μ)² + γ Σ_{σ entries of l} (σ_C − σ)² (eq. 2).

    ``stats`` (B, F), ``centroids`` (K, F) → (B, K, L). Chunked over B to bound memory. In layer
    mode (one μ and one σ per layer) the per-layer sum is the single addition μ² + γσ², the same
    floating-point operations as the general path.
    """
    b, f = stats.shape
    k = centroids.shape[0]
    if layout.scalar and b * k * f <= _CHUNK_ELEMENTS:
        diff = (stats[:, None, :] - centroids[None]).square_()
        half = layout.num_layers
        return diff[..., :half].add_(diff[..., half:].mul_(layout.weight[half:].to(stats.device)))
    out = stats.new_zeros(b, k, layout.num_layers)
    seg, weight = layout.segment.to(stats.device), layout.weight.to(stats.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, k * f))
    for start in range(0, b, chunk):
        diff = stats[start:start + chunk, None, :] - centroids[None]
        out[start:start + chunk].index_add_(2, seg, diff.square_().mul_(weight))
    return out


def assign(stats: torch.Tensor, centroids: torch.Tensor, layout: StatsLayout
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per image and layer: (assignment (B, L) long, its distance (B, L))."""
    dist = knowledge_distance(stats, centroids, layout)
    best, idx = dist.min(dim=1)  # ties → the lower centroid index
    return idx, best


def _update(centroids: torch.Tensor, stats: torch.Tensor, assignment: torch.Tensor, lam: float,
            layout: StatsLayout, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`update_centroids` plus the (K, L) mask of the centroids that moved."""
    k, f = centroids.shape
    seg = layout.segment.to(stats.device)
    moved_counts = stats.new_zeros(k, layout.num_layers).scatter_add_(
        0, assignment, torch.ones_like(assignment, dtype=stats.dtype))
    counts = moved_counts[:, seg]
    if stats.shape[0] == 1:  # one image: its statistics are the mean (s / 1 = s exactly)
        mean = stats.expand(k, f)
    else:
        sums = stats.new_zeros(k, f).scatter_add_(0, assignment[:, seg], stats)
        mean = sums / counts.clamp(min=1)
    step = (mean - centroids) if rule == "toward_mean" else mean
    return torch.where(counts > 0, centroids + lam * step, centroids), moved_counts > 0


def update_centroids(centroids: torch.Tensor, stats: torch.Tensor, assignment: torch.Tensor,
                     lam: float, layout: StatsLayout, rule: str = "toward_mean") -> torch.Tensor:
    """One update step: per layer, each centroid moves by λ toward (``toward_mean``) — or by λ
    times (``literal``) — the mean of the statistics assigned to it; unassigned centroids stay.

    ``centroids`` (K, F), ``stats`` (B, F), ``assignment`` (B, L). Returns a new tensor.
    """
    check_choice("strategy.update_rule", rule, UPDATE_RULES)
    return _update(centroids, stats, assignment, lam, layout, rule)[0]


class CentroidUpdater:
    """Consumes per-image statistics in traversal order and updates the centroids every
    ``update_batch_size`` images, whatever the size of the forward batches they arrive in.

    λ_t is annealed over ``ceil(num_images / update_batch_size)`` steps (known up front). Rows left
    over at the end of a forward batch wait for the next one; :meth:`finish` runs the last, smaller
    step. Also tracks, per layer and centroid, the share of its initial value it still holds
    (``residual``: ∏(1 − λ_t) over the steps in which it moved, for ``toward_mean``; the literal
    rule adds to the initial value, which keeps weight 1) and the net movement over
    :data:`SHIFT_WINDOWS` equal windows of steps.
    """

    def __init__(self, centroids: torch.Tensor, layout: StatsLayout, num_images: int,
                 update_batch_size: int, lambda_max: float, lambda_min: float,
                 t_max: str = "last_step", rule: str = "toward_mean") -> None:
        check_choice("strategy.update_rule", rule, UPDATE_RULES)
        if update_batch_size < 1:
            raise ConfigError(f"strategy.update_batch_size={update_batch_size} must be >= 1")
        self.layout, self.rule, self.size = layout, rule, int(update_batch_size)
        self.num_images = int(num_images)
        self.num_steps = math.ceil(self.num_images / self.size)
        self.lambdas = lambda_schedule(self.num_steps, lambda_max, lambda_min, t_max)
        self.centroids = centroids.clone()
        k, num_layers = centroids.shape[0], layout.num_layers
        self.residual = torch.ones(k, num_layers, dtype=torch.float64, device=centroids.device)
        self.moves = torch.zeros(k, num_layers, dtype=torch.long, device=centroids.device)
        self.step = 0
        self.seen = 0
        self.skipped = 0
        self._pending: Optional[torch.Tensor] = None
        self._pending_keep: Optional[torch.Tensor] = None
        windows = min(SHIFT_WINDOWS, self.num_steps)
        self.window_ends = {round((w + 1) * self.num_steps / windows) for w in range(windows)}
        self.shifts: list[float] = []
        self._snapshot = self.centroids

    def feed(self, stats: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Take the next rows (traversal order) and run every full update step they complete.

        ``keep`` (bool per row) marks the rows of images that decoded; the others (corrupt files)
        hold their traversal position but move nothing, so every image keeps the λ_t of its
        position and the schedule still ends at λ_min.
        """
        if keep is not None and bool(keep.all()):
            keep = None  # the common case: no per-step mask work
        if self._pending is not None:
            if keep is not None or self._pending_keep is not None:
                keep = torch.cat([_ones_if_none(self._pending_keep, self._pending),
                                  _ones_if_none(keep, stats)])
            stats = torch.cat([self._pending, stats])
            self._pending = self._pending_keep = None
        full = stats.shape[0] - stats.shape[0] % self.size
        for start in range(0, full, self.size):
            self._step(stats[start:start + self.size],
                       None if keep is None else keep[start:start + self.size])
        if full < stats.shape[0]:
            self._pending = stats[full:]
            self._pending_keep = None if keep is None else keep[full:]

    def finish(self) -> torch.Tensor:
        """Run the last (smaller) step if rows are pending; return the final centroids."""
        if self._pending is not None:
            self._step(self._pending, self._pending_keep)
            self._pending = self._pending_keep = None
        if self.step != self.num_steps or self.seen + self.skipped != self.num_images:
            raise RuntimeError(f"selectq: {self.seen} images (+{self.skipped} skipped) in {self.step} "
                               f"update steps, expected {self.num_images} in {self.num_steps}")
        return self.centroids

    def _step(self, chunk: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        if keep is not None and not bool(keep.all()):
            self.skipped += int((~keep).sum())
            chunk = chunk[keep]
            if chunk.shape[0] == 0:  # only corrupt files in this step: it passes, nothing moves
                self.step += 1
                self._window()
                return
        lam = self.lambdas[self.step]
        idx, _ = assign(chunk, self.centroids, self.layout)
        self.centroids, moved = _update(self.centroids, chunk, idx, lam, self.layout, self.rule)
        if self.rule == "toward_mean":
            self.residual = torch.where(moved, self.residual * (1.0 - lam), self.residual)
        self.moves += moved
        self.step += 1
        self.seen += chunk.shape[0]
        self._window()

    def _window(self) -> None:
        if self.step in self.window_ends:
            self.shifts.append(layer_shift(self._snapshot, self.centroids, self.layout))
            self._snapshot = self.centroids


def _ones_if_none(keep: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device) if keep is None else keep


def layer_shift(before: torch.Tensor, after: torch.Tensor, layout: StatsLayout) -> float:
    """Mean over layers of the Frobenius norm of the change of that layer's K centroids."""
    sq = (after - before).square().sum(0)
    per_layer = sq.new_zeros(layout.num_layers).index_add_(0, layout.segment.to(sq.device), sq)
    return float(per_layer.sqrt().mean())


def score(stats: torch.Tensor, centroids: torch.Tensor, layout: StatsLayout
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Σ_l min_j D(C_l^j) per image (eq. 5) and the per-layer nearest centroid (B, L)."""
    idx, best = assign(stats, centroids, layout)
    return best.sum(1), idx


def score_pool(stats: torch.Tensor, centroids: torch.Tensor, layout: StatsLayout,
               chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the whole pool and the per-layer cluster sizes (L, K), in chunks of rows so an
    ImageNet-sized pool never materialises its (N, K, L) distances or (N, L) assignments."""
    k = centroids.shape[0]
    scores = stats.new_empty(stats.shape[0])
    sizes = torch.zeros(layout.num_layers, k, dtype=torch.long)
    for start in range(0, stats.shape[0], chunk):
        total, idx = score(stats[start:start + chunk], centroids, layout)
        scores[start:start + chunk] = total
        sizes.scatter_add_(1, idx.t().cpu(), torch.ones(idx.t().shape, dtype=torch.long))
    return scores, sizes


def rank(scores: torch.Tensor, n: int, select: str) -> torch.Tensor:
    """Positions of the ``n`` lowest or highest scores, best first; ties → lower position."""
    check_choice("strategy.select", select, SELECT)
    order = torch.sort(scores, descending=(select == "highest"), stable=True).indices
    return order[:n]
