"""``selectq``: calibration-data selection by dynamic clustering of activation statistics.

SelectQ (Zhang et al., Machine Intelligence Research 2025, ``papers/000_8e5482a96f4fddd0.txt``,
section 4) has no public code; this is the first implementation. What the paper fixes:

* statistics of every weight-layer (Conv2d/Linear) *output*, per image: layer-wise mean μ and
  standard deviation σ (channel-wise is mentioned as a variant: ``stats=channel``);
* Knowledge Distance to a centroid C: ``D = ||μ_C − μ||² + γ||σ_C − σ||²`` (eq. 2), γ = 1;
* K = 10 centroids per layer initialised from the statistics of K uniformly random inputs;
* one epoch over the training set; for every image and layer the *nearest* centroid moves,
  with a step λ_t cosine-annealed over the epoch (eq. 4), λ_max = 0.1, λ_min = 0.001;
* score ``S = Σ_layers min_j D(C_j)`` with the final centroids (eq. 5); no backward pass, no BN
  parameters (the model stays in eval mode, its BN running statistics are never touched).

Where the paper is ambiguous, each reading is a config switch (defaults first; docs/selectq.md
has the reasoning):

* ``update_rule``: ``toward_mean`` ``C ← C + λ_t (s − C)`` (moves the centroid toward the
  statistics, as the text and Fig. 5 describe) | ``literal`` ``C ← C + λ_t s`` (eq. 3 as printed;
  the centroids grow without bound — kept reachable so the divergence can be shown).
* ``update_batch_size``: images per centroid-update step, independent of the forward batch. The
  per-image statistics are consumed in traversal order, ``update_batch_size`` at a time: per layer,
  each centroid that is the nearest one of at least one image of the chunk (assignments use the
  centroids from before the chunk) moves by λ_t toward the mean of the statistics assigned to it;
  the others stay. ``1`` is the paper's literal per-image reading (every image moves its nearest
  centroid, the next image sees the move). λ_t is annealed over the update steps,
  ``ceil(pool / update_batch_size)`` of them. The forward batch (``batch_size``) is speed only.
* ``anneal_t_max``: ``last_step`` (t_max = number of steps − 1: λ_0 = λ_max and the last step
  gets λ_min exactly) | ``num_steps`` (the text's "t_max is the total amount of batches" with
  t = 0..T−1: the last step stays slightly above λ_min). A single step gets λ_max. The text
  also says λ_min is "the beginning" while eq. 4 starts at λ_max; we follow the formula — the
  text's reading is reachable by swapping the two values.
* ``select``: ``lowest`` | ``highest``. The paper says the highest scores are picked; its
  motivation (filter out images with outlier statistics, Figs. 3 and 8) points to the lowest.
  The default is ``lowest``, decided on the validation split (docs/results.md).
* ``stats``: ``layer`` (one μ, σ per layer: the paper's choice) | ``channel`` (one per channel;
  distances are summed over the channels of a layer, as the squared L2 norm of eq. 2 reads).
  Channel statistics of an output with no spatial extent (a Linear layer, an SE block's 1×1
  conv) are the value itself with σ = 0.
* ``shuffle``: the pool is traversed in a seeded random order (what a ``shuffle=True`` training
  loader does). ``false`` traverses in dataset order, which for a class-sorted ImageFolder drags
  the annealed centroids toward the last classes.
* ``pool_size``: the first ``pool_size`` images of the run's shared pool order
  (``ctx.pool_permutation()``; ``null`` → ``budget.pool_size``, ``null`` there too → the whole
  calibration pool, i.e. the train split minus the validation split — the paper's setting). At one
  seed, ``random`` draws from the head of the same order, so it samples SelectQ's pool uniformly.

Fixed decisions (not switches): σ is the population std (correction 0 — the per-channel σ of a
1×1 output would be NaN otherwise), computed in two passes (mean, then the norm of the
centred tensor) for accuracy; ties go to the lower centroid index and, in the ranking, to the
lower dataset index; the K random inputs are drawn in [0, 1] pixel space from the run's
``"selectq/init"`` stream and mapped through the model's normalization; the traversal order
comes from the ``"selectq/order"`` stream.

One traversal, not two: every image's statistics (2 floats per layer in ``layer`` mode) are
kept from the update pass and ranked once the centroids are final, which gives exactly the
scores of the paper's second traversal (the model is unchanged between the passes).

``info["indices"]`` are train-split indices in **rank order** (best first), aligned with
``info["scores"]`` and with the returned images and labels. ``info["init_residual"]`` says how
much of its random-noise start each centroid still holds at the end.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from calibbench.config import ConfigError, RunConfig, StrategyConfig, check_choice
from calibbench.datasets import CORRUPT_LABEL, warn_skipped
from calibbench.modes import eval_mode
from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext, register
from calibbench.strategies.random import check_pool
from calibbench.strategies.selectq_clustering import (
    ANNEAL_T_MAX,
    SELECT,
    UPDATE_RULES,
    CentroidUpdater,
    StatsLayout,
    rank,
    score_pool,
)

log = logging.getLogger(__name__)

STATS = ("layer", "channel")
# Named random streams of the run (ctx.generator): the random init inputs and the traversal order.
# The pool subset is the head of the run's shared "pool" stream (ctx.pool_permutation()).
STREAM_INIT, STREAM_ORDER = "selectq/init", "selectq/order"
_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


@dataclass
class SelectQConfig(StrategyConfig):
    name: str = "selectq"
    num_centroids: int = 10  # K per layer (paper: 10)
    gamma: float = 1.0  # weight of the σ term in the Knowledge Distance (eq. 2)
    lambda_max: float = 0.1  # λ at the first update step (eq. 4)
    lambda_min: float = 0.001  # λ at the last update step
    anneal_t_max: str = "last_step"  # last_step | num_steps
    stats: str = "layer"  # layer | channel
    update_rule: str = "toward_mean"  # toward_mean | literal
    update_batch_size: int = 1  # images per centroid-update step (1 = per image, the paper)
    select: str = "lowest"  # lowest | highest
    pool_size: Optional[int] = None  # None → budget.pool_size → whole calibration pool
    shuffle: bool = True  # seeded random traversal order of the pool
    batch_size: Optional[int] = None  # forward batch (speed only); None → budget.eval_batch_size


def validate(cfg: SelectQConfig) -> None:
    """Range and choice checks with one readable message (Hydra only checks types)."""
    check_choice("strategy.stats", cfg.stats, STATS)
    check_choice("strategy.update_rule", cfg.update_rule, UPDATE_RULES)
    check_choice("strategy.anneal_t_max", cfg.anneal_t_max, ANNEAL_T_MAX)
    check_choice("strategy.select", cfg.select, SELECT)
    if cfg.num_centroids < 1:
        raise ConfigError(f"strategy.num_centroids={cfg.num_centroids} must be >= 1")
    if cfg.update_batch_size < 1:
        raise ConfigError(f"strategy.update_batch_size={cfg.update_batch_size} must be >= 1 "
                          f"(images per centroid-update step; 1 = per-image updates)")
    for key in ("gamma", "lambda_max", "lambda_min"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"strategy.{key}={value} must be a finite number >= 0")
    for key in ("pool_size", "batch_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"strategy.{key}={value} must be >= 1 or null")


class ActivationStats:
    """Forward hooks on every Conv2d/Linear that record per-image (μ, σ) of the layer output.

    Used as a context manager so the hooks never outlive the selection. Per layer the hook does
    two reductions (mean, then the norm of the centred output): ``torch.var_mean`` is Welford
    and measured ~8× slower here, and E[x²] − E[x]² cancels badly when |μ| ≫ σ.
    """

    def __init__(self, model: nn.Module, stats: str = "layer") -> None:
        check_choice("strategy.stats", stats, STATS)
        self.model = model
        self.channelwise = stats == "channel"
        self.modules = [(name, m) for name, m in model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not self.modules:
            raise ConfigError(f"SelectQ needs Conv2d/Linear layers; {type(model).__name__} has none")
        self._handles: list[Any] = []
        self._mu: list[torch.Tensor] = []
        self._sigma: list[torch.Tensor] = []
        self._names: list[str] = []
        self.names: Optional[list[str]] = None
        self.channels: Optional[list[int]] = None

    def __enter__(self) -> "ActivationStats":
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            mu, sigma = self.reduce(output)
            self._mu.append(mu)
            self._sigma.append(sigma)
            self._names.append(name)
        return hook

    def reduce(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) of one layer output, each (B, c): c = 1 (layer) or the channel count."""
        y = y.detach().float()
        b = y.shape[0]
        if not self.channelwise:
            x = y.reshape(b, -1)
        elif y.dim() == 2:  # Linear (B, F): each channel is a single value
            return y, torch.zeros_like(y)
        elif y.dim() == 4:  # Conv2d (B, C, H, W)
            x = y.reshape(b, y.shape[1], -1)
        else:  # Linear on (B, ..., F): the channel is the last dim
            x = y.reshape(b, -1, y.shape[-1]).transpose(1, 2)
        mu = x.mean(-1, keepdim=True)
        sigma = torch.linalg.vector_norm(x - mu, dim=-1) / math.sqrt(x.shape[-1])
        return mu.reshape(b, -1), sigma.reshape(b, -1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Run the model on ``images`` and return their (B, F) statistics (on the images' device).

        A single image is run as a batch of two (itself twice) and the copy dropped: CPU
        convolutions take another kernel for a batch of one, whose outputs differ in the last
        bits (~1e-5) from the same image inside any larger batch. With the pad, an image's
        statistics do not depend on the forward batch size (or on landing alone in the last
        batch), which keeps the selection independent of ``batch_size``.
        """
        self._mu.clear()
        self._sigma.clear()
        self._names.clear()
        single = images.shape[0] == 1
        self.model(torch.cat([images, images]) if single else images)
        if single:
            self._mu[:] = [m[:1] for m in self._mu]
            self._sigma[:] = [s[:1] for s in self._sigma]
        if self.names is None:  # the first forward fixes the layout
            self.names = list(self._names)
            self.channels = [int(m.shape[1]) for m in self._mu]
        elif self._names != self.names:
            raise RuntimeError(f"the hooked layers changed between forward passes "
                               f"({len(self._names)} outputs, expected {len(self.names)})")
        out = torch.cat(self._mu + self._sigma, dim=1)
        self._mu.clear()
        self._sigma.clear()
        return out

    def layout(self, gamma: float) -> StatsLayout:
        if self.names is None or self.channels is None:
            raise RuntimeError("layout is known after the first forward pass")
        return StatsLayout.build(self.names, self.channels, gamma)


# ----------------------------------------------------------------------------------------------
# Pool and traversal


def resolve_pool_size(cfg: SelectQConfig, ctx: StrategyContext) -> int:
    """The number of images SelectQ traverses: ``strategy.pool_size`` → ``budget.pool_size`` →
    the whole calibration pool, capped at the pool's size."""
    size = cfg.pool_size if cfg.pool_size is not None else ctx.budget.pool_size
    n_pool = len(ctx.data.pool)
    return n_pool if size is None else min(int(size), n_pool)


def pool_and_order(ctx: StrategyContext, pool_size: Optional[int], shuffle: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, order): the pool's train indices sorted ascending, and the traversal order as
    positions into ``pool``. The pool is the head of the run's shared pool order
    (``ctx.pool_permutation()``), or all of ``ctx.data.pool`` when ``pool_size`` is None or not
    smaller. Seeded; the benchmark reuses it to time the same loader."""
    full = ctx.data.pool
    if pool_size is None or pool_size >= len(full):
        pool = full.clone()
    else:
        pool = ctx.pool_permutation()[:pool_size].sort().values
    if shuffle:
        order = torch.randperm(len(pool), generator=ctx.generator(STREAM_ORDER))
    else:
        order = torch.arange(len(pool))
    return pool, order


def random_inputs(ctx: StrategyContext, k: int) -> torch.Tensor:
    """K images with U(0, 1) pixels (seeded), in the model's normalized input space."""
    size = ctx.data.input_size
    pixels = torch.rand(k, 3, size, size, generator=ctx.generator(STREAM_INIT))
    return ctx.data.normalize(pixels).to(ctx.device)


def residual_summary(residual: torch.Tensor, moves: torch.Tensor, sizes: torch.Tensor,
                     names: Sequence[str], rule: str) -> dict[str, Any]:
    """``info["init_residual"]`` from the (K, L) residuals, move counts and the (L, K) final
    cluster sizes: per layer the max and mean over the centroids that moved, the pool-weighted
    mean (the share of noise in the centroid an average pool image is scored against) and the
    number of centroids that never moved; overall the worst layer of each."""
    residual, moves = residual.double().cpu(), moves.cpu()
    weights = sizes.t().double()  # (K, L)
    per_layer: list[dict[str, Any]] = []
    for j, name in enumerate(names):
        moved = moves[:, j] > 0
        r = residual[moved, j]
        per_layer.append({
            "layer": name,
            "max_moved": float(r.max()) if len(r) else None,
            "mean_moved": float(r.mean()) if len(r) else None,
            "weighted": float((residual[:, j] * weights[:, j]).sum() / weights[:, j].sum().clamp(min=1)),
            "never_moved": int((~moved).sum()),
        })

    def worst(key: str) -> Optional[float]:
        values = [p[key] for p in per_layer if p[key] is not None]
        return max(values) if values else None

    return {
        "rule": rule,
        "max_moved": worst("max_moved"),
        "weighted": worst("weighted"),
        "weighted_mean": sum(p["weighted"] for p in per_layer) / max(1, len(per_layer)),
        "never_moved": sum(p["never_moved"] for p in per_layer),
        "centroids": int(residual.numel()),
        "per_layer": per_layer,
        "per_centroid": residual.t().tolist(),  # (L, K), like cluster_sizes
    }


# ----------------------------------------------------------------------------------------------


@dataclass
class ClusteringResult:
    """Everything the single pass produces; ranking needs only ``stats`` and ``centroids``."""

    pool: torch.Tensor  # (N,) train indices, ascending
    stats: torch.Tensor  # (N, F) per-image statistics, rows aligned with ``pool``
    init_centroids: torch.Tensor  # (K, F)
    centroids: torch.Tensor  # (K, F) final
    layout: StatsLayout
    lambdas: list[float]  # one per update step
    residual: torch.Tensor  # (K, L) share of its initial value each centroid still holds
    moves: torch.Tensor  # (K, L) number of update steps in which each centroid moved
    shifts: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # train indices of corrupt files, not in ``pool``


@register("selectq", SelectQConfig)
class SelectQ(Strategy):
    """Rank the pool by distance to activation-statistics centroids learned in one pass."""

    cfg: SelectQConfig

    # The paper's text picks the highest scores and moves the nearest centroid per image.
    paper_reading = {"select": "highest", "update_batch_size": 1}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """``strategy.*`` ranges and choices, before any work (preflight)."""
        validate(cfg.strategy)

    def forward_batch_size(self, ctx: StrategyContext) -> int:
        return int(self.cfg.batch_size or ctx.budget.eval_batch_size)

    def resolved_config(self, ctx: StrategyContext) -> dict[str, Any]:
        """Fallbacks resolved: ``pool_size`` (→ budget → the whole pool, capped at the pool) and
        the forward ``batch_size`` (→ ``budget.eval_batch_size``; speed only, but kept in the key
        so a cache entry never depends on that claim)."""
        out = super().resolved_config(ctx)
        out["pool_size"] = resolve_pool_size(self.cfg, ctx)
        out["batch_size"] = self.forward_batch_size(ctx)
        return out

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        cfg = self.cfg
        validate(cfg)
        pool_size = resolve_pool_size(cfg, ctx)
        pool, order = pool_and_order(ctx, pool_size, cfg.shuffle)
        what = (f"the SelectQ pool (pool_size={pool_size})" if pool_size < len(ctx.data.pool)
                else "the train split outside the validation split")
        check_pool(ctx.num_samples, len(pool), what)

        result = self.cluster(ctx, pool, order)
        if result.skipped:
            check_pool(ctx.num_samples, len(result.pool),
                       f"{what}, after dropping {len(result.skipped)} corrupt image file(s)")
        t0 = time.perf_counter()
        with torch.inference_mode():
            scores, sizes = score_pool(result.stats, result.centroids, result.layout)
            chosen = rank(scores, ctx.num_samples, cfg.select)
        result.seconds["rank"] = time.perf_counter() - t0
        indices = result.pool[chosen].tolist()  # corrupt files are no longer in result.pool

        t0 = time.perf_counter()
        images, labels = ctx.data.load(indices, "train", ctx.budget.calib_batch_size)
        result.seconds["load"] = time.perf_counter() - t0
        info = self._info(ctx, result, scores, sizes, chosen, indices, labels)
        log.info("selectq: %d of %d images (%s scores %.4g … %.4g), %d layers, %d update steps, "
                 "init residual ≤ %.3g (pool-weighted), %.1fs pass", len(indices), len(pool),
                 cfg.select, info["scores"][0], info["scores"][-1], result.layout.num_layers,
                 len(result.lambdas), info["init_residual"]["weighted"], result.seconds["pass"])
        return CalibrationSet(images, labels, info)

    def cluster(self, ctx: StrategyContext, pool: torch.Tensor, order: torch.Tensor
                ) -> ClusteringResult:
        """Init the centroids, traverse the pool once updating them, keep every image's stats."""
        cfg = self.cfg
        batch_size = self.forward_batch_size(ctx)
        model = ctx.model
        # eval mode: BN uses its running statistics and never updates them
        with eval_mode(model), ActivationStats(model, cfg.stats) as tap, torch.inference_mode():
            t0 = time.perf_counter()
            init = tap(random_inputs(ctx, cfg.num_centroids))
            layout = tap.layout(cfg.gamma).to(init.device)
            updater = CentroidUpdater(init, layout, len(pool), cfg.update_batch_size,
                                      cfg.lambda_max, cfg.lambda_min, cfg.anneal_t_max,
                                      cfg.update_rule)
            seconds = {"init": time.perf_counter() - t0}
            _warn_memory(len(pool), init.shape[1])
            stats = torch.empty(len(pool), init.shape[1])
            t0 = time.perf_counter()
            # Corrupt files come out labelled CORRUPT_LABEL: they keep their traversal position
            # (and λ_t) but give no statistics, and leave the pool before ranking.
            loader = ctx.data.loader(ctx.data.train, batch_size, pool[order].tolist(),
                                     skip_corrupt=True)
            bar = tqdm(total=len(pool), unit="img", desc="selectq", disable=not ctx.progress,
                       leave=False)
            start = 0
            valid = torch.ones(len(pool), dtype=torch.bool)
            for images, labels in loader:
                keep = labels != CORRUPT_LABEL
                stop = start + images.shape[0]
                if bool(keep.all()):
                    batch = tap(images.to(ctx.device, non_blocking=True))
                else:
                    valid[order[start:stop][~keep]] = False
                    batch = torch.full((images.shape[0], init.shape[1]), float("nan"), device=init.device)
                    if bool(keep.any()):
                        batch[keep.to(init.device)] = tap(images[keep].to(ctx.device, non_blocking=True))
                updater.feed(batch, keep.to(batch.device))
                stats[order[start:stop]] = batch.cpu()  # one device→host copy per batch
                start = stop
                bar.update(images.shape[0])
            bar.close()
            if start != len(pool):
                raise RuntimeError(f"the loader yielded {start} images for a pool of {len(pool)}")
            centroids = updater.finish()
            seconds["pass"] = time.perf_counter() - t0
        skipped = pool[~valid].tolist()
        if skipped:
            warn_skipped(ctx.data, skipped, "train", "the SelectQ pool")
            pool, stats = pool[valid], stats[valid]
        cpu = torch.device("cpu")
        return ClusteringResult(pool, stats, init.cpu(), centroids.cpu(), layout.to(cpu),
                                updater.lambdas, updater.residual.cpu(), updater.moves.cpu(),
                                updater.shifts, seconds, skipped)

    def _info(self, ctx: StrategyContext, r: ClusteringResult, scores: torch.Tensor,
              sizes: torch.Tensor, chosen: torch.Tensor, indices: list[int],
              labels: torch.Tensor) -> dict[str, Any]:
        """JSON-ready summary: small per-layer tables, per-window scalars, pool quantiles."""
        cfg = self.cfg
        layout, half = r.layout, r.layout.half
        seg = layout.segment[:half]
        channels = torch.tensor(layout.channels, dtype=torch.float32)
        # (K, L) tables: the value itself in layer mode, the mean over channels in channel mode
        mu, sigma = (part.new_zeros(part.shape[0], layout.num_layers).index_add_(1, seg, part)
                     / channels for part in (r.centroids[:, :half], r.centroids[:, half:]))
        centroids = [{"layer": name, "mu": m, "sigma": s}
                     for name, m, s in zip(layout.names, mu.t().tolist(), sigma.t().tolist())]
        q = torch.tensor(_QUANTILES, dtype=torch.float64)
        quantiles = torch.quantile(scores.double(), q).tolist()
        return {
            "indices": indices,  # train-split indices, rank order (best first)
            "indices_order": "rank (best first)",
            "scores": scores[chosen].tolist(),
            "select": cfg.select,
            "pool_size": len(r.pool),
            "images_seen": len(r.pool),  # every pool image is read once (corrupt files: not decoded)
            "skipped_corrupt": r.skipped,
            "num_layers": layout.num_layers,
            "stats": cfg.stats,
            "update_batch_size": cfg.update_batch_size,
            "update_steps": len(r.lambdas),
            "centroids": centroids,
            "centroids_reduced": "none" if cfg.stats == "layer" else "channel_mean",
            "cluster_sizes": sizes.tolist(),
            "init_residual": residual_summary(r.residual, r.moves, sizes, layout.names,
                                              cfg.update_rule),
            "centroid_moves": r.moves.t().tolist(),  # (L, K): update steps in which each moved
            "centroid_shift": r.shifts,
            "centroid_shift_windows": len(r.shifts),
            "centroid_norm": {"init": float(r.init_centroids.norm()),
                              "final": float(r.centroids.norm())},
            "lambda": {"max": cfg.lambda_max, "min": cfg.lambda_min,
                       "first": r.lambdas[0], "last": r.lambdas[-1],
                       "num_steps": len(r.lambdas), "sum": math.fsum(r.lambdas)},
            "streams": {"init": STREAM_INIT, "order": STREAM_ORDER if cfg.shuffle else None,
                        "pool": "pool" if len(r.pool) < len(ctx.data.pool) else None},
            "pool_score_quantiles": {f"{qq:g}": v for qq, v in zip(_QUANTILES, quantiles)},
            "class_counts": torch.bincount(labels, minlength=ctx.data.num_classes).tolist(),
            "seconds": {key: round(v, 3) for key, v in r.seconds.items()},
        }


def _warn_memory(pool: int, features: int) -> None:
    """The one-pass design keeps N × F floats; say so before a channel-mode ImageNet run OOMs."""
    gib = pool * features * 4 / 2**30
    if gib > 2:
        log.warning("selectq keeps %.1f GiB of statistics (%d images × %d floats); use "
                    "stats=layer or a smaller pool_size if memory is short", gib, pool, features)
