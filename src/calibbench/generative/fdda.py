"""``fdda``: Fine-grained Data Distribution Alignment (Zhong et al., ECCV 2022;
``papers/002_7a1e44882833f1db.txt``, METHODS.md "FDDA"). Where the paper and the public code
(zysxmu/FDDA) disagree, calibbench implements the paper and offers the code's reading as a switch
when it is cheap; docs/generators.md ("FDDA") has the full table.

**Real calibration set** (paper §3.1): one real image per class from the calibration pool, the
first image of each class in the run's seeded pool order (``ctx.pool_permutation()``, shared with
``random``/SelectQ). ``real_labels=dataset`` takes the dataset's labels; ``real_labels=predicted``
never reads them: the pool is scanned in the same order (at most ``budget.pool_size`` images) and
the first image the FP model *predicts* as class c becomes class c's image (paper footnote 1 and
Table 1 "w/o label"). A class without an image (not in the pool / never predicted) keeps only CE
and BNS, as in the paper's "available classes" ablation (Fig. 5): its C-BNS/D-BNS are omitted.

**Centers** (eq. 6): the per-image BN-input statistics (channel mean and variance over the spatial
positions, biased, as a BN layer sees them) of class c's real image in the deep layers. With L BN
layers numbered **1..L as in the paper's sums**, the deep layers are l = K..L, K = ceil(L/2) − 2,
i.e. 0-based indices K−1..L−1 (resnet20: L = 21 with the two shortcut BNs, K = 9, layers 9..21 =
13 layers). The public code uses K as a 0-based start (one layer fewer): ``k_indexing=zero_based``.

**Generator loss** (eq. 10): α1·CE + α2·BNS + α3·D-BNS + α4·C-BNS, α = (0.5, 0.2, 0.9, 0.05)
(``strategy.losses``; the code's α4 is 0.01). BNS is the shared ``bns`` term (batch statistics,
all layers). C-BNS (``cbns``) pulls each synthetic sample's deep-layer statistics to its class's
center; D-BNS (``dbns``) to the center plus Gaussian noise N(0, v_μ) on the mean and N(0, v_σ) on
the variance, v_μ = 0.5, v_σ = 1.0 read as **variances** (the paper's N(·, v)); the code passes
them as standard deviations (``noise_param=std``). The noise is drawn afresh for every synthetic
sample at every step ("for each synthetic data x̃, its target is sampled", §3.3), from the run's
``fdda/dbns/<step>`` stream.

Per-image vs per-batch statistics (a decision): the paper's centers are per-image statistics and
D-BNS samples a target per synthetic image, so C-BNS/D-BNS compare **per-image** statistics of
each synthetic image (``fine_stats=image``). The code compares the *batch* statistics of an extra
single-class generator batch; ``fine_stats=class_batch`` is the cheap version of that reading:
the batch statistics of each class's samples within the step's batch (one noise draw per class).
Like ``bns``, each term is an MSE (mean over channels, and samples or classes) averaged over the
deep layers, not the paper's plain sum: the α were tuned on the code, which averages.

**Quantized model** (eq. 11, ``refine=fdda``): every step one generator batch plus a real batch
(``real_batch``: ``min(gen_batch_size, #real images)`` real images without replacement, the code's
batch), CE + α5·KD with α5 = 20 (KD at T = 20, the code's; the paper writes KL without T), SGD
Nesterov, wd 1e-4, cosine; the generator is warmed up alone first (``budget.gen_warmup_steps``).
The activation ranges are calibrated on ``num_samples`` images sampled from the warmed-up
generator (inherited; the code's ranges also follow generated batches only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from calibbench.bnstats import BNStatsRecorder
from calibbench.config import ConfigError, RunConfig, check_choice
from calibbench.generative.refiners import GeneratorRefiner
from calibbench.generative.strategy import (
    K_INDEXING,
    GeneratorStrategy,
    GeneratorStrategyConfig,
    class_stats,
    deep_start,
)
from calibbench.generative.terms import GenLossTerm, GenStepOutputs, gen_term, moment_mse, noisy_targets, spread
from calibbench.modes import eval_mode
from calibbench.refine import register as register_refiner
from calibbench.seeding import stream_seed
from calibbench.strategies.base import CalibrationSet, StrategyContext, register

log = logging.getLogger(__name__)

REAL_LABELS = ("dataset", "predicted")
NOISE_PARAMS = ("variance", "std")
FINE_STATS = ("image", "class_batch")


@dataclass
class FDDAConfig(GeneratorStrategyConfig):
    name: str = "fdda"
    real_labels: str = "dataset"  # dataset | predicted (the FP model's prediction; labels unused)
    k_indexing: str = "one_based"  # one_based: the paper's l = K..L | zero_based: the code's
    v_mu: float = 0.5  # D-BNS noise on the mean
    v_sigma: float = 1.0  # D-BNS noise on the variance (std with bns_moment=std)
    noise_param: str = "variance"  # variance: N(c, v) (paper) | std: N(c, v^2) (code)
    fine_stats: str = "image"  # image: per-image statistics (paper) | class_batch: per-class batch (code)
    real_batch_size: Optional[int] = None  # null: min(budget.gen_batch_size, number of real images)


class _FineTerm(GenLossTerm):
    """C-BNS / D-BNS: each synthetic sample's (or class's) deep-layer statistics to its class's
    center (+ noise for D-BNS). ``state``: the strategy's centers (see :meth:`FDDA.setup_state`)."""

    per_image_stats = True
    noisy = False

    def targets(self, center_mean: Tensor, center_mom: Tensor, keys: Tensor, layer: int, step: int,
                state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Targets (rows of ``keys``: one per sample or class) for one deep layer."""
        t_mean, t_mom = center_mean[keys], center_mom[keys]
        if self.noisy:  # seeded per (step, layer): the run's fdda/dbns stream
            g = torch.Generator().manual_seed(stream_seed(int(state["seed"]), f"fdda/dbns/{step}/{layer}"))
            scale = (lambda v: math.sqrt(v)) if self.cfg.noise_param == "variance" else (lambda v: v)
            t_mean, t_mom = noisy_targets(t_mean, t_mom, scale(float(self.cfg.v_mu)),
                                          scale(float(self.cfg.v_sigma)), g)
        return t_mean, t_mom

    def __call__(self, out: GenStepOutputs) -> Tensor:
        state, kind = out.state, getattr(self.cfg, "bns_moment", "var")
        start, has = int(state["k"]), state["has_center"].to(out.labels.device)
        keep = has[out.labels]
        if out.bn_image is None:
            raise RuntimeError("fdda: the generator step recorded no per-image BN statistics")
        if not bool(keep.any()):  # no sample of a class with a real image: nothing to align
            return out.images.sum() * 0.0
        labels = out.labels[keep]
        losses = []
        for j, (mean, std) in enumerate(out.bn_image[start:]):
            c_mean = state["center_mean"][j].to(mean)
            c_std = state["center_std"][j].to(mean)
            mean, std = mean[keep], std[keep]
            if self.cfg.fine_stats == "class_batch":
                keys, mean, std = class_stats(mean, std, labels)
            else:
                keys = labels
            t_mean, t_mom = self.targets(c_mean, spread(c_std, kind), keys, start + j, out.step, state)
            losses.append(moment_mse(mean, std, t_mean, t_mom, kind))
        return torch.stack(losses).mean()


@gen_term("cbns")
class CBNSTerm(_FineTerm):
    """BNS-centralized loss (eq. 6): deep-layer statistics of a class-c sample to class c's center."""


@gen_term("dbns")
class DBNSTerm(_FineTerm):
    """BNS-distorted loss (eq. 7): to class c's center plus Gaussian noise (v_μ, v_σ), resampled
    for every synthetic sample (``fine_stats=class_batch``: every class) at every step."""

    noisy = True


@register_refiner("fdda")
class FDDARefiner(GeneratorRefiner):
    """FDDA's quantized-model side (eq. 11): CE + 20·KD on real + synthetic batches."""


@register("fdda", FDDAConfig)
class FDDA(GeneratorStrategy):
    """GDFQ's generator with FDDA's fine-grained BNS terms, real images in every student batch."""

    cfg: FDDAConfig

    def __init__(self, cfg: FDDAConfig) -> None:
        super().__init__(cfg)
        self._real: Optional[dict[str, Any]] = None

    def check_run(self, cfg: RunConfig) -> None:
        super().check_run(cfg)
        check_choice("strategy fdda real_labels", self.cfg.real_labels, REAL_LABELS)
        check_choice("strategy fdda k_indexing", self.cfg.k_indexing, K_INDEXING)
        check_choice("strategy fdda noise_param", self.cfg.noise_param, NOISE_PARAMS)
        check_choice("strategy fdda fine_stats", self.cfg.fine_stats, FINE_STATS)
        for key in ("v_mu", "v_sigma"):
            if float(getattr(self.cfg, key)) < 0:
                raise ConfigError(f"strategy.{key}={getattr(self.cfg, key)} must be >= 0 (a noise variance)")
        if self.cfg.real_batch_size is not None and int(self.cfg.real_batch_size) < 0:
            raise ConfigError(f"strategy.real_batch_size={self.cfg.real_batch_size} must be >= 0 (or null)")

    # -- the real calibration set ----------------------------------------------------------------
    def real_set(self, ctx: StrategyContext) -> dict[str, Any]:
        """One real image per class: ``images``, ``labels``, train ``indices`` (class order),
        ``missing`` classes; computed once per run (deterministic: the seeded pool order)."""
        if self._real is not None and self._real["seed"] == ctx.seed:
            return self._real
        k = self.model_classes(ctx)
        order = ctx.pool_permutation()
        if self.cfg.real_labels == "dataset":
            # The first pool image of each class in the pool order; a corrupt file gives way to
            # the next image of its class.
            targets = torch.tensor(ctx.data.targets("train"))[order].tolist()
            candidates: dict[int, list[int]] = {}
            for i, c in zip(order.tolist(), targets):
                if 0 <= c < k:
                    candidates.setdefault(c, []).append(i)
            classes = sorted(candidates)
            if classes:
                images, labels, indices, _ = ctx.data.fill(
                    [candidates[c] for c in classes], [1] * len(classes), int(ctx.budget.calib_batch_size))
                by_class = sorted(range(len(indices)), key=lambda j: int(labels[j]))
                images, labels = images[by_class], labels[by_class]
                indices = [indices[j] for j in by_class]
            else:
                images, labels, indices = torch.empty(0), torch.empty(0, dtype=torch.long), []
            scanned = None
        else:
            images, labels, indices, scanned = self._by_prediction(ctx, order, k)
        if not indices:
            raise ConfigError(f"strategy fdda: no real image found for any of the model's {k} classes "
                              f"in the calibration pool ({len(order)} images)")
        present = set(labels.tolist())
        missing = [c for c in range(k) if c not in present]
        if missing:
            log.warning("fdda: %d of %d classes have no real image (%s...): their C-BNS/D-BNS are "
                        "omitted (the paper's 'available classes')", len(missing), k, missing[:5])
        self._real = {"seed": ctx.seed, "images": images.float(), "labels": labels.long(),
                      "indices": [int(i) for i in indices], "missing": missing, "num_classes": k,
                      "scanned": scanned}
        return self._real

    @torch.no_grad()
    def _by_prediction(self, ctx: StrategyContext, order: Tensor, k: int
                       ) -> tuple[Tensor, Tensor, list[int], int]:
        """Scan the pool in order; the first image predicted as c is class c's (labels unused)."""
        limit = len(order) if ctx.budget.pool_size is None else min(len(order), int(ctx.budget.pool_size))
        batch = int(ctx.budget.calib_batch_size)
        found: dict[int, tuple[int, Tensor]] = {}
        scanned = 0
        with eval_mode(ctx.model):
            for start in range(0, limit, batch):
                x, _, idx, _ = ctx.data.load_valid(order[start:min(limit, start + batch)].tolist(), "train",
                                                   batch)
                scanned += len(idx)
                if not idx:
                    continue
                pred = ctx.model(x.to(ctx.device)).argmax(1).cpu().tolist()
                for i, c in enumerate(pred):
                    if c not in found:
                        found[c] = (idx[i], x[i])
                if len(found) == k:
                    break
        classes = sorted(found)
        images = torch.stack([found[c][1] for c in classes]) if classes else torch.empty(0)
        return images, torch.tensor(classes, dtype=torch.long), [found[c][0] for c in classes], scanned

    # -- hooks -------------------------------------------------------------------------------
    def setup_state(self, ctx: StrategyContext, layers: list[tuple[str, _BatchNorm]]) -> dict[str, Any]:
        """Centers: per deep layer, a (num_classes × C) mean and std of each class's real image
        (zeros where a class has none; ``has_center`` masks it), with the layers' eps."""
        real = self.real_set(ctx)
        start = deep_start(len(layers), self.cfg.k_indexing)
        deep = list(layers[start:])
        k = real["num_classes"]
        with eval_mode(ctx.model):
            # Per-image statistics in eval mode do not depend on the batch: forwarded in chunks of
            # budget.calib_batch_size, so ImageNet's 1000 real images never form one 224x224 batch.
            chunk = max(1, int(ctx.budget.calib_batch_size))
            parts: list[list[tuple[Tensor, Tensor]]] = []
            with torch.no_grad(), BNStatsRecorder(ctx.model, layers=deep, per_image=True, detach=True,
                                                  correction=self.bn_correction) as rec:
                for begin in range(0, len(real["images"]), chunk):
                    rec.clear()
                    ctx.model(real["images"][begin:begin + chunk].to(ctx.device))
                    parts.append([(m.cpu(), s.cpu()) for m, s in rec.image_stats()])
        stats = [(torch.cat([p[j][0] for p in parts]), torch.cat([p[j][1] for p in parts]))
                 for j in range(len(parts[0]))]
        labels = real["labels"]
        means, stds = [], []
        for mean, std in stats:
            m = torch.zeros(k, mean.shape[1])
            s = torch.ones(k, std.shape[1])
            m[labels], s[labels] = mean.cpu(), std.cpu()
            means.append(m)
            stds.append(s)
        has = torch.zeros(k, dtype=torch.bool)
        has[labels] = True
        return {"seed": int(ctx.seed), "k": start, "center_mean": means, "center_std": stds,
                "has_center": has, "eps": [float(bn.eps) for _, bn in deep],
                "deep_layers": [name for name, _ in deep]}

    def real_batch(self, ctx: StrategyContext, batch_size: int, generator: torch.Generator
                   ) -> Optional[tuple[Tensor, Tensor]]:
        real = self.real_set(ctx)
        n = len(real["labels"])
        size = min(batch_size, n) if self.cfg.real_batch_size is None else min(int(self.cfg.real_batch_size), n)
        if size == 0:
            return None
        take = torch.randperm(n, generator=generator)[:size]
        return real["images"][take], real["labels"][take]

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        layers = self.bn_layers(ctx.model)  # a model without BN fails here, naming fdda
        real = self.real_set(ctx)
        calib = super().calibration_set(ctx)
        start = deep_start(len(layers), self.cfg.k_indexing)
        counts = torch.bincount(real["labels"], minlength=real["num_classes"])
        calib.info.update({
            "real_indices": real["indices"], "real_labels": real["labels"].tolist(),
            "real_label_source": self.cfg.real_labels, "real_per_class_counts": counts.tolist(),
            "real_missing_classes": real["missing"], "real_pool_scanned": real["scanned"],
            "real_in_calibration_set": False, "num_bn_layers": len(layers), "deep_start_index": start,
            "deep_layers": [name for name, _ in layers[start:]], "k_indexing": self.cfg.k_indexing})
        return calib


__all__ = ["FDDA", "FDDAConfig", "CBNSTerm", "DBNSTerm", "FDDARefiner"]
