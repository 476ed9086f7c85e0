"""Base of the generator-based strategies (gdfq, fdda, clusterq in this package).

A :class:`GeneratorStrategy` owns the *generator player*: the conditional generator
(``network.py``), its loss terms (``strategy.losses``: name → weight, from the ``GEN_TERMS``
registry of ``terms.py``), its Adam optimizer, the latent/label stream, and the hooks a method
changes:

- :meth:`bn_layers` — which BN layers of the FP model are recorded (default: every BatchNorm2d);
- :meth:`setup_state` — per-run state built once (FDDA's per-class centers, ClusterQ's centroids);
  it is passed to every term as ``GenStepOutputs.state``;
- :meth:`update_state` — called after every generator step, under ``no_grad``, with that step's
  outputs (ClusterQ's EMA of correctly classified samples' statistics);
- :meth:`real_batch` — an extra *real* batch for the quantized-model step (FDDA mixes its real
  calibration images in); ``None`` (the default) trains on synthetic images only;
- :meth:`refinement_record` — what the method adds to the ``refine`` record from the state the
  refinement stage ended with (ClusterQ: its centroid shifts and EMA counts).

The *quantized-model player* and the alternating loop are the refinement stage's
(``alternating.py``, ``refine=gdfq``: ``refiners.py``): the generator is trained inside
refinement, not in the strategy's ``batches`` (which a generator strategy does not override).
Before that, :meth:`calibration_set` warms the generator up alone for
``budget.gen_warmup_steps`` steps (the same Lightning module, without a student) and samples
``num_samples`` class-balanced images from it to calibrate the activation ranges; the warmed-up
generator, its optimizer state and the method's state travel to the refinement stage as a
:class:`~calibbench.generative.handover.GeneratorHandover` in ``CalibrationSet.state``. See
docs/generators.md.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from calibbench.bnstats import find_bn_layers
from calibbench.config import ConfigError, StrategyConfig, check_choice
from calibbench.generative.handover import GeneratorHandover
from calibbench.generative.network import LATENT_DIM, VARIANTS, Generator, build_generator
from calibbench.generative.refiners import refiner_class
from calibbench.generative.terms import BNS_MOMENTS, GenLossTerm, GenStepOutputs, build_gen_terms
from calibbench.modes import eval_mode
from calibbench.seeding import stream_seed
from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext

log = logging.getLogger(__name__)

LABEL_MODES = ("uniform", "balanced")
K_INDEXING = ("one_based", "zero_based")


def deep_start(num_layers: int, k_indexing: str) -> int:
    """0-based index of the first "deep" BN layer, ``K = ceil(L/2) − 2`` (FDDA's paper, ClusterQ's
    code): ``one_based`` counts layers from 1 as the paper's sums do (index K − 1); ``zero_based``
    uses K as the index, as the public code does (one layer fewer). Never below 0."""
    k = math.ceil(num_layers / 2) - 2
    return max(0, k - 1 if k_indexing == "one_based" else k)


def class_stats(mean: Tensor, std: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(classes present, their pooled mean, their pooled std) from per-image ``mean``/``std`` (N×D,
    std = sqrt(var + eps)), by the law of total variance (biased, eps once, as a BN layer in
    training mode sees a single-class batch): per class ``avg m_i`` and
    ``sqrt(avg s_i² + avg (m_i − mean_c)²)``. Only present classes are formed."""
    present = torch.unique(labels)
    member = (labels[:, None] == present[None, :]).to(mean.dtype)  # N × K
    weights = member / member.sum(0, keepdim=True)
    cmean = weights.T @ mean
    dev = mean - (member @ cmean)  # each image minus its class mean
    cstd = torch.sqrt(weights.T @ (std.pow(2) + dev.pow(2)))
    return present, cmean, cstd


@dataclass
class GeneratorStrategyConfig(StrategyConfig):
    """The generator player's options (sizes come from the budget: gen_warmup_steps, gen_batch_size)."""

    num_classes: Optional[int] = None  # null: the model's; set: must equal the model's
    latent_dim: int = LATENT_DIM
    variant: str = "auto"  # auto (cifar up to 64 px, else imagenet) | cifar | imagenet
    lr: float = 1e-3  # Adam
    beta1: float = 0.5
    beta2: float = 0.999
    losses: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "bns": 0.1})
    bns_moment: str = "var"  # bns: var (the GDFQ code) | std (the paper's sigma)
    labels: str = "uniform"  # uniform: i.i.d. labels per batch (GDFQ code) | balanced: each batch cycles the classes


class GeneratorStrategy(Strategy):
    """A strategy whose images come from a conditional generator trained against the FP model."""

    cfg: GeneratorStrategyConfig

    synthetic = True
    trains_generator = True
    bn_correction = 0  # batch statistics as a BN layer in training mode sees them (biased variance)

    # -- hooks for subclasses ---------------------------------------------------------------------
    def bn_layers(self, model: nn.Module) -> list[tuple[str, _BatchNorm]]:
        """The FP model's BN layers whose input statistics the generator terms read."""
        try:
            return find_bn_layers(model)
        except ConfigError as err:
            raise ConfigError(f"strategy {self.name} needs a model with BatchNorm layers (its generator "
                              f"loss matches BN statistics): {err}") from None

    def setup_state(self, ctx: StrategyContext, layers: list[tuple[str, _BatchNorm]]) -> dict[str, Any]:
        """Per-run state handed to every generator term (``GenStepOutputs.state``)."""
        return {}

    def update_state(self, state: dict[str, Any], out: GenStepOutputs, step: int) -> None:
        """After every generator step, under ``no_grad``: update ``state`` from the step's outputs."""

    def real_batch(self, ctx: StrategyContext, batch_size: int, generator: torch.Generator
                   ) -> Optional[tuple[Tensor, Tensor]]:
        """Real (images, labels) added to the quantized model's batch of this step, or None."""
        return None

    def refinement_record(self, state: dict[str, Any]) -> dict[str, Any]:
        """What the method adds to the ``refine`` record, from the state the alternating
        refinement ended with (``state`` as :meth:`update_state` left it)."""
        return {}

    # -- the generator player -------------------------------------------------------------------
    def check_run(self, cfg: Any) -> None:
        if cfg.refine.name == "none":
            raise ConfigError(
                f"strategy={self.name} with refine=none: the generator and the quantized model are "
                f"trained together inside the refinement stage, so there is nothing to run without "
                f"it; use this strategy's default (refine={self.name}, or refine=kd to distil on the "
                f"warmed-up generator's fixed calibration set)")
        if refiner_class(cfg.refine.name).requires == "generator":
            self.gen_terms()  # unknown/negative generator terms fail before any work
        check_choice(f"strategy {self.name} variant", self.cfg.variant, VARIANTS)
        check_choice(f"strategy {self.name} labels", self.cfg.labels, LABEL_MODES)
        check_choice(f"strategy {self.name} bns_moment", self.cfg.bns_moment, BNS_MOMENTS)

    def gen_terms(self) -> list[tuple[str, float, GenLossTerm]]:
        return build_gen_terms(self.cfg, self.name)

    def model_classes(self, ctx: StrategyContext) -> int:
        """The FP model's number of outputs (one forward pass of a zero image)."""
        x = torch.zeros(1, len(ctx.data.mean), ctx.data.input_size, ctx.data.input_size, device=ctx.device)
        with eval_mode(ctx.model), torch.no_grad():
            return int(ctx.model(x).shape[1])

    def build_generator(self, ctx: StrategyContext) -> Generator:
        """The generator, initialised from the run's ``generator/init`` stream."""
        model_classes = self.model_classes(ctx)
        classes = self.cfg.num_classes if self.cfg.num_classes is not None else model_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(ctx.seed, "generator/init"))
            gen = build_generator(classes, model_classes, ctx.data.input_size, len(ctx.data.mean),
                                  int(self.cfg.latent_dim), self.cfg.variant, self.name)
        return gen.to(ctx.device)

    def optimizer(self, generator: Generator) -> torch.optim.Optimizer:
        return torch.optim.Adam(generator.parameters(), lr=float(self.cfg.lr),
                                betas=(float(self.cfg.beta1), float(self.cfg.beta2)))

    def labels(self, n: int, num_classes: int, generator: torch.Generator) -> Tensor:
        if self.cfg.labels == "uniform":
            return torch.randint(0, num_classes, (n,), generator=generator)
        start = int(torch.randint(0, num_classes, (1,), generator=generator))
        return (torch.arange(n) + start) % num_classes

    def generator_inputs(self, ctx: StrategyContext, batch_size: int, num_classes: int, latent_dim: int,
                         generator: torch.Generator) -> Iterator[dict[str, Tensor]]:
        """The alternating loop's stream: endless ``{"z", "y"}`` (+ ``"real_x", "real_y"`` when
        :meth:`real_batch` gives a real batch) drawn from ``generator``."""
        while True:
            item = {"z": torch.randn(batch_size, latent_dim, generator=generator),
                    "y": self.labels(batch_size, num_classes, generator)}
            real = self.real_batch(ctx, batch_size, generator)
            if real is not None:
                item["real_x"], item["real_y"] = real
            yield item

    @torch.no_grad()
    def sample(self, gen: Generator, n: int, batch_size: int, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
        """``n`` images with class-balanced labels (shuffled), in near-equal batches of at most
        ``batch_size``, the generator in training mode (batch statistics, as it was trained)."""
        labels = (torch.arange(n) % gen.num_classes)[torch.randperm(n, generator=generator)]
        z = torch.randn(n, gen.latent_dim, generator=generator)
        device = next(gen.parameters()).device
        chunks = max(1, -(-n // batch_size))
        gen.train()
        images = [gen(zc.to(device), yc.to(device)).cpu()
                  for zc, yc in zip(z.tensor_split(chunks), labels.tensor_split(chunks))]
        return torch.cat(images).float(), labels

    def sampler(self, ctx: StrategyContext, calib: CalibrationSet, generator: torch.Generator
                ) -> Callable[[int], Tensor]:
        """``n -> n`` fresh images from the generator handed over with ``calib`` (not trained
        further; class-balanced labels, :meth:`sample`), drawn from ``generator``."""
        handover = GeneratorHandover.from_calibration(calib, f"strategy {self.name}")
        gen = self.build_generator(ctx)
        gen.load_state_dict(handover.generator)
        gen.requires_grad_(False)

        def sample(n: int) -> Tensor:
            images, _ = self.sample(gen, int(n), int(n), generator)
            return images

        return sample

    def calibration_set(self, ctx: StrategyContext) -> CalibrationSet:
        from calibbench.generative.alternating import warm_up  # Lightning only when training

        start = time.perf_counter()
        layers = self.bn_layers(ctx.model)
        gen = self.build_generator(ctx)
        steps, batch_size = int(ctx.budget.gen_warmup_steps), int(ctx.budget.gen_batch_size)
        warm = warm_up(gen, ctx.model, self, ctx, layers, steps, batch_size)
        handover = GeneratorHandover({k: v.detach().cpu().clone() for k, v in gen.state_dict().items()},
                                     warm["optimizer"], warm["state"], warm["class_counts"])
        images, labels = self.sample(gen, ctx.num_samples, batch_size, ctx.generator("generator/sample"))
        counts = warm["class_counts"] + torch.bincount(labels, minlength=gen.num_classes)
        info = {"warmup_steps": steps, "gen_batch_size": batch_size, "generator_variant": gen.variant,
                "generator_terms": {name: w for name, w, _ in self.gen_terms()},
                "images_generated": steps * batch_size + ctx.num_samples,
                "per_class_counts": counts.tolist(), "warmup_curve": warm["curve"],
                "warmup_seconds": warm["seconds"], "seconds": round(time.perf_counter() - start, 3)}
        return CalibrationSet(images, labels, info, handover.to_state())


__all__ = ["GeneratorStrategy", "GeneratorStrategyConfig", "LABEL_MODES", "K_INDEXING", "deep_start",
           "class_stats"]
