"""Loss terms of a refinement objective: each maps one step's outputs to a scalar.

A refinement objective is a weighted sum of named terms (``refine.losses: {kd: 1.0, ce: 0.5}``);
each term is logged on its own every step. Terms register themselves with ``@term("name")``, so a
method-specific objective (FDDA's CE + 20·KD, PLF's pseudo-label CE) adds a class here, not an
``if`` in the training module.

- ``kd``: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, ``refine.kd_reduction``: ``batchmean`` (the
  per-sample KL summed over classes, averaged over the batch, as Hinton et al. and ClusterQ's code)
  or ``mean`` (element-wise, 1/classes of it: GDFQ's ``nn.KLDivLoss()``); the T² keeps the gradient
  scale independent of T.
- ``ce``: cross-entropy of the student's logits to the batch's labels (``ce_labels=batch``: the
  stream's real or assigned labels) or to the teacher's argmax (``ce_labels=teacher``).
- ``feature``: MSE between the outputs of the named intermediate modules of student and teacher
  (forward hooks; a module path names the same place in both, since quantization only replaces
  modules in place), averaged over the modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calibbench.config import ConfigError, RefineConfig
from calibbench.registry import Registry


@dataclass
class StepOutputs:
    """What one refinement step computed; the teacher's tensors carry no gradient."""

    student_logits: Tensor
    teacher_logits: Tensor
    labels: Optional[Tensor] = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    step: Optional[int] = None  # 1-based refinement step (terms with a schedule read it)


@dataclass
class RefinePlan:
    """What a term may need to know before training starts (PLF's threshold schedule counts
    epochs over the stream; its feature term picks module paths in the student)."""

    steps: int
    batch_size: int
    num_images: int  # images in the calibration set the stream replays
    student: nn.Module
    teacher: nn.Module


class LossTerm(ABC):
    """One named term; ``cfg`` is the RefineConfig (a term reads only its own options)."""

    name: str = ""
    # Module paths whose outputs the training module must record (for the feature term).
    feature_modules: tuple[str, ...] = ()

    def __init__(self, cfg: RefineConfig) -> None:
        self.cfg = cfg

    def setup(self, plan: RefinePlan) -> None:
        """Called once before the training module is built (after the models are final)."""

    @abstractmethod
    def __call__(self, out: StepOutputs) -> Tensor:
        """The term's scalar value for this step."""


TERMS: Registry[type[LossTerm]] = Registry("refine loss term")


def term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a loss term available as ``refine.losses.<name>``."""
    return TERMS.register(name)


def available_terms() -> list[str]:
    return TERMS.available()


KD_REDUCTIONS = ("batchmean", "mean")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            reduction: str = "batchmean") -> Tensor:
    """``T² · KL(teacher ‖ student)`` on temperature-softened distributions: ``batchmean`` (summed
    over classes, mean over the batch) or ``mean`` (element-wise mean, i.e. batchmean / classes:
    GDFQ's ``nn.KLDivLoss()``)."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    # "mean" written out (torch warns that its reduction="mean" will become batchmean)
    return kl if reduction == "batchmean" else kl / student_logits.shape[1]


@term("kd")
class KDTerm(LossTerm):
    def __call__(self, out: StepOutputs) -> Tensor:
        return kd_loss(out.student_logits, out.teacher_logits, self.cfg.temperature,
                       str(getattr(self.cfg, "kd_reduction", "batchmean")))


@term("ce")
class CETerm(LossTerm):
    def __call__(self, out: StepOutputs) -> Tensor:
        if self.cfg.ce_labels == "teacher":
            labels = out.teacher_logits.argmax(dim=1)
        elif out.labels is None:
            raise ConfigError("refine loss 'ce' with refine.ce_labels=batch needs labels, but this "
                              "strategy's stream has none; use refine.ce_labels=teacher (the FP "
                              "model's argmax) or drop the ce term")
        else:
            labels = out.labels
        return F.cross_entropy(out.student_logits, labels)


@term("feature")
class FeatureTerm(LossTerm):
    def __init__(self, cfg: RefineConfig) -> None:
        super().__init__(cfg)
        self.feature_modules = tuple(cfg.feature_modules)

    def __call__(self, out: StepOutputs) -> Tensor:
        losses = [F.mse_loss(out.student_features[name], out.teacher_features[name])
                  for name in self.feature_modules]
        return torch.stack(losses).mean()


def build_terms(cfg: RefineConfig) -> list[tuple[str, float, LossTerm]]:
    """``(name, weight, term)`` for every term with a positive weight, in config order."""
    return [(name, float(weight), TERMS.get(name)(cfg)) for name, weight in cfg.losses.items()
            if float(weight) > 0]
