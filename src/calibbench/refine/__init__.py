"""Refinement stage after calibration: ``none`` (pure PTQ) or training the fake-quant model.

``refine=kd`` distils the FP model into the calibrated fake-quant model on Lightning
(``distill.py``), fed by ``strategy.batches(ctx, calib, batch_size, generator)`` (``stream.py``)
with a weighted sum of loss terms (``losses.py``: kd, ce, feature). Reconstruction
(``refine=adaround|brecq|qdrop``, ``recon.py``) learns each unit's weight rounding on the
calibration images. Method-specific refiners (PLF here; FDDA, ClusterQ in the generator stage)
are the same loop with their own terms and streams: a class registered here with
``@register("name")`` plus ``conf/refine/<name>.yaml``. The generator stage
(``calibbench.generative``: ``refine=gdfq|fdda|clusterq``) registers its refiners here too; they
train a generator strategy's generator and the quantized model alternately (Lightning manual
optimization, the same module family as ``kd``). This package never imports that one.

Public doors: :func:`available` (registered names), :func:`validate` (every refine option, before
any work), :func:`run` (train in place, return what ``result.json`` records under ``refine``).
Sizes come from the budget: ``budget.refine_steps`` and ``budget.refine_batch_size`` (which
``refine.batch_size`` overrides when set).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from calibbench.config import ConfigError, ModelConfig, RefineConfig, RunConfig, check_choice
from calibbench.refine.losses import KD_REDUCTIONS, TERMS, LossTerm, available_terms
from calibbench.registry import Registry

if TYPE_CHECKING:  # strategies/ imports refine/ (its generator refiners): annotations only
    from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext
    from calibbench.tracking import Tracker

OPTIMIZERS = ("sgd", "adam")
CE_LABELS = ("batch", "teacher")
ACT_RANGES = ("frozen", "learned")
BN_MODES = ("frozen", "train")


class Refiner(ABC):
    """One refinement method. ``cfg`` is the RefineConfig."""

    name: str = ""
    # What the refiner needs from the calibration stage: "generator" = a strategy that trains one
    # (``Strategy.trains_generator``); None = any calibration set.
    requires: Optional[str] = None

    def __init__(self, cfg: RefineConfig) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Checks of the run config ``cfg`` that only this refiner knows; raise ConfigError."""

    @classmethod
    def check_strategy(cls, cfg: RunConfig, strategy: Strategy) -> None:
        """The strategy x refiner combination (preflight calls it with the built strategy, before
        any work): what this refiner ``requires`` of the calibration stage, compared with what
        the strategy declares (``Strategy.trains_generator``), so neither imports the other."""
        if cls.requires == "generator" and not strategy.trains_generator:
            raise ConfigError(f"refine={cfg.refine.name} trains a generator together with the quantized "
                              f"model and needs a generator strategy; strategy={cfg.strategy.name} has "
                              f"none. Use refine=kd with it")

    @abstractmethod
    def run(self, qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, track: Optional[Tracker] = None) -> dict[str, Any]:
        """Refine ``qmodel`` in place; return the ``refine`` part of the record."""


_REGISTRY: Registry[type[Refiner]] = Registry("refine")


def register(name: str) -> Callable[[type[Refiner]], type[Refiner]]:
    """Class decorator: make a refiner available as ``refine=<name>`` (plus conf/refine/<name>.yaml)."""
    return _REGISTRY.register(name)


def available() -> list[str]:
    return _REGISTRY.available()


def get(name: str) -> type[Refiner]:
    """The refiner class registered as ``name`` (an unknown name lists the registered ones)."""
    return _REGISTRY.get(name)


def build(cfg: RefineConfig) -> Refiner:
    return _REGISTRY.get(cfg.name)(cfg)


def refine_record(steps: int, batch_size: Optional[int], images_seen: int, seconds: float,
                  loss_first: Optional[float], loss_last: Optional[float], terms: dict[str, float],
                  curve: dict[str, list], **extra: Any) -> dict[str, Any]:
    """What ``result.json`` records under ``refine``, in one shape for every refiner: the common
    fields, the refiner's own (``extra``), the thinned curve last."""
    return {"steps": steps, "batch_size": batch_size, "images_seen": images_seen, "seconds": seconds,
            "loss_first": loss_first, "loss_last": loss_last, "terms": terms, **extra, "curve": curve}


def empty_record(batch_size: Optional[int] = None, **extra: Any) -> dict[str, Any]:
    """The ``refine`` record of a stage that trained nothing (``extra`` after the curve)."""
    return {**refine_record(0, batch_size, 0, 0.0, None, None, {}, {}), **extra}


@register("none")
class NoRefine(Refiner):
    """Pure post-training quantization: the calibrated model is evaluated as it is."""

    def run(self, qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, track: Optional[Tracker] = None) -> dict[str, Any]:
        return empty_record()


@register("kd")
class Distill(Refiner):
    """Knowledge distillation from the FP model (terms and weights from ``refine.losses``)."""

    @classmethod
    def weights(cls, cfg: RefineConfig) -> dict[str, float]:
        """Loss term -> weight of this refiner's objective (``refine.losses``)."""
        return {name: float(w) for name, w in cfg.losses.items()}

    def terms(self) -> list[tuple[str, float, LossTerm]]:
        return [(name, w, TERMS.get(name)(self.cfg)) for name, w in self.weights(self.cfg).items() if w > 0]

    def run(self, qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, track: Optional[Tracker] = None) -> dict[str, Any]:
        from calibbench.refine.distill import distill  # Lightning is imported only when training

        steps = int(ctx.budget.refine_steps)
        batch_size = int(self.cfg.batch_size or ctx.budget.refine_batch_size)
        if steps == 0:
            return empty_record(batch_size)
        check_feature_modules(self.cfg, teacher, qmodel)
        record = distill(qmodel, teacher, strategy, ctx, calib, self.cfg, steps, batch_size, track,
                         terms=self.terms())
        return {**record, **self.extra_record(teacher, ctx, calib, steps, batch_size)}

    def extra_record(self, teacher: nn.Module, ctx: StrategyContext, calib: CalibrationSet, steps: int,
                     batch_size: int) -> dict[str, Any]:
        """What a subclass adds to the ``refine`` record (PLF: its reliability split)."""
        return {}


@register("plf")
class PseudoLabelFiltering(Distill):
    """PLF (Fan et al.): L_KL + tau (L_CE^h + beta L_CE^l + mu L_MSE) on the shared distillation
    module; ``refine.losses`` (default ``kd: 1``, the L_KL of eq. 15) plus the terms of
    ``refine/plf.py`` weighted from ``refine.plf``."""

    @classmethod
    def check_strategy(cls, cfg: RunConfig, strategy: Strategy) -> None:
        from calibbench.refine.plf import check_stream

        super().check_strategy(cfg, strategy)
        check_stream(strategy)

    @classmethod
    def weights(cls, cfg: RefineConfig) -> dict[str, float]:
        from calibbench.refine.plf import plf_weights

        return {**super().weights(cfg), **plf_weights(cfg)}

    def extra_record(self, teacher: nn.Module, ctx: StrategyContext, calib: CalibrationSet, steps: int,
                     batch_size: int) -> dict[str, Any]:
        from calibbench.refine.plf import ReliabilitySchedule, reliability_record

        p = self.cfg.plf
        schedule = ReliabilitySchedule(p.t_low, p.t_high, steps, batch_size, len(calib))
        return {"plf": reliability_record(teacher, calib.images, schedule, torch.device(ctx.device))}


def build_optimizer(groups: list[dict[str, Any]], cfg: RefineConfig) -> torch.optim.Optimizer:
    """The refinement stage's optimizer (``refine.optimizer``: sgd with momentum/nesterov, or
    adam) over parameter groups; a group's own ``lr`` / ``weight_decay`` win over ``cfg``'s."""
    lr, weight_decay = float(cfg.lr), float(cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
                               weight_decay=weight_decay)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def _active_terms(cfg: RefineConfig) -> list[str]:
    refiner = _REGISTRY.get(cfg.name) if cfg.name in _REGISTRY.available() else None
    weights = refiner.weights(cfg) if refiner is not None and issubclass(refiner, Distill) \
        else {name: float(w) for name, w in cfg.losses.items()}
    return [name for name, weight in weights.items() if weight > 0]


def check_feature_modules(cfg: RefineConfig, *models: nn.Module) -> None:
    """Every ``refine.feature_modules`` name exists in each model (when the feature term is on)."""
    if "feature" not in _active_terms(cfg):
        return
    for model in models:
        names = {name for name, _ in model.named_modules() if name}
        missing = [m for m in cfg.feature_modules if m not in names]
        if missing:
            sample = ", ".join(sorted(names)[:12])
            raise ConfigError(f"refine.feature_modules: {missing} not in model "
                              f"{type(model).__name__}; module names look like: {sample}, ...")


def _architecture(model_cfg: ModelConfig) -> nn.Module:
    """The model's architecture without weights, on the meta device (no memory, no download)."""
    from calibbench.models import _architecture as build_arch

    with torch.device("meta"):
        return build_arch(model_cfg, pretrained=False)


def validate(cfg: RunConfig) -> None:
    """Every refine option of the run config ``cfg`` (and the refine budget): one ConfigError."""
    r = cfg.refine
    check_choice("refine", r.name, available())
    _REGISTRY.get(r.name).check(cfg)
    steps = cfg.budget.refine_steps
    if steps is None or int(steps) < 0:
        raise ConfigError(f"budget.refine_steps={steps} is out of range: a step count, must be >= 0")
    if r.batch_size is not None and int(r.batch_size) < 1:
        raise ConfigError(f"refine.batch_size={r.batch_size} must be >= 1 (or null: budget.refine_batch_size)")
    for key, weight in r.losses.items():
        check_choice("refine loss term", key, available_terms())
        if float(weight) < 0:
            raise ConfigError(f"refine.losses.{key}={weight} is negative; loss weights must be >= 0 "
                              f"(0 switches a term off)")
    if r.name != "none" and int(steps) > 0 and not _active_terms(r):
        raise ConfigError(f"refine={r.name} has no loss term with a positive weight "
                          f"(refine.losses={dict(r.losses)}); valid terms: {', '.join(available_terms())}")
    if not float(r.temperature) > 0:
        raise ConfigError(f"refine.temperature={r.temperature} must be > 0")
    if not float(r.lr) > 0:
        raise ConfigError(f"refine.lr={r.lr} must be > 0")
    if float(r.weight_decay) < 0:
        raise ConfigError(f"refine.weight_decay={r.weight_decay} must be >= 0")
    if not 0 <= float(r.momentum) < 1:
        raise ConfigError(f"refine.momentum={r.momentum} must be in [0, 1)")
    check_choice("refine.optimizer", r.optimizer, OPTIMIZERS)
    if r.optimizer == "sgd" and r.nesterov and float(r.momentum) == 0:
        raise ConfigError("refine.nesterov=true needs refine.momentum > 0")
    check_choice("refine.ce_labels", r.ce_labels, CE_LABELS)
    check_choice("refine.kd_reduction", r.kd_reduction, KD_REDUCTIONS)
    check_choice("refine.act_ranges", r.act_ranges, ACT_RANGES)
    check_choice("refine.bn", r.bn, BN_MODES)
    if r.name == "plf":
        plf.validate(cfg)
    if "feature" in _active_terms(r):
        if not r.feature_modules:
            raise ConfigError("refine loss 'feature' needs refine.feature_modules: the module paths "
                              "whose outputs student and teacher should match")
        if r.name != "none":
            check_feature_modules(r, _architecture(cfg.model))


def run(qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
        calib: CalibrationSet, cfg: RefineConfig, track: Optional[Tracker] = None) -> dict[str, Any]:
    """Refine ``qmodel`` in place per ``cfg`` (a RefineConfig); return what to record (steps,
    batch size, images seen, seconds, first/last loss, the thinned loss curve)."""
    return build(cfg).run(qmodel, teacher, strategy, ctx, calib, track)


# PLF's loss terms and reconstruction (adaround, brecq, qdrop) register themselves on import; the
# generator stage's refiners (gdfq, fdda, clusterq) register when calibbench.generative is imported.
from calibbench.refine import plf, recon  # noqa: E402,F401

__all__ = ["Refiner", "register", "available", "build", "validate", "run", "TERMS",
           "check_feature_modules", "build_optimizer", "empty_record", "refine_record"]
