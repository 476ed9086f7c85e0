"""``refine=plf``: the pseudo-label-filtering objective of Fan et al. (``papers/004``), section 3.

The FP model's softmax on each refinement image is scored by its normalized self-entropy (eq. 3);
images at or below a threshold t are high-reliable, the rest low-reliable (eq. 4); t falls
linearly from T_u to T_l over the refinement epochs (eq. 5). High-reliable images get the FP
argmax as their label (eq. 6-7), low-reliable ones the top-two classes weighted by their
renormalized probabilities (eq. 8-10). The objective is

    L_total = L_KL + tau * (L_CE^h + beta * L_CE^l + mu * L_MSE)          (eq. 11, 12, 15)

built as loss terms of the shared distillation module (``distill.py``), never a second loop:
``kd`` (eq. 14: KL(FP || quantized), T = 1), ``plf_high`` (eq. 7), ``plf_low`` (eq. 9) and
``plf_mse`` (eq. 13), weighted 1, tau, tau*beta, tau*mu. The three PLF terms are ordinary
registered terms, so ``refine=kd +refine.losses.plf_high=1 +refine.losses.plf_low=0.3`` adds the
multiple pseudo-labels to plain distillation on any strategy's data (the paper's Table 6 idea).

Decisions where the paper is silent (docs/plf.md):
- "computed once": the FP model is frozen (eval mode), so a sample's entropy is a function of the
  image alone; each step recomputes it from the teacher logits the KL term needs anyway (no extra
  pass), and the record's histogram and per-epoch split sizes come from one FP pass over the
  whole set before training.
- Epochs: the stream replays the set, so epoch e covers images e*N .. (e+1)*N - 1 of the stream
  (N = set size); E = ceil(steps * batch / N). ``f_t(epoch) = epoch / (E - 1)`` with 0-based
  epochs, so the first epoch uses T_u and the last T_l (the paper's epoch / E reaches neither
  end with 0-based epochs and skips T_u with 1-based ones).
- A batch with no high- (low-) reliable sample contributes 0 to L_CE^h (L_CE^l): eq. 7 and 9
  average over N_h, N_l, which are then 0.
- eq. 13 names neither the layers nor the scale of "the intermediate feature layers". Read
  literally (the raw feature maps' MSE, summed over layers) with the paper's mu = 100 the loss
  starts ~500x the KL and the fine-tuning diverges here (resnet20 W4A4: 19.0 % val top-1,
  docs/plf.md). HAST (lihuantong/HAST, ``trainer_direct.py``; PLF compares against it with the
  same 5120 images and pytorchcv models) aligns features as the per-sample L2-normalized channel
  energy normalize(mean_hw(x^2)), MSE per layer summed over layers; that is the scale mu = 100
  (CIFAR) / 4000 (ImageNet) fits, so ``feature_map=attention`` is the default. IntraQ's trainer
  (zysxmu/IntraQ) has no feature term at all. HAST's layers are every pytorchcv ``ResUnit.body``
  output (before the residual add: 9 on resnet20), ``DwsConvBlock.pw_conv.bn`` and
  ``LinearBottleneck.conv3`` (``features=hast``); the default ``features=stages`` (every stage's
  output) is calibbench's own choice, from no reference code; the two are yet to be compared on
  the validation split. ``feature_map=raw`` and ``features=units|bn|list`` are the other readings.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from calibbench.config import ConfigError, RefineConfig, RunConfig, check_choice, check_plf_values
from calibbench.modes import eval_mode
from calibbench.refine.losses import LossTerm, RefinePlan, StepOutputs, term

if TYPE_CHECKING:  # strategies/ imports refine/: annotations only
    from calibbench.strategies.base import Strategy

log = logging.getLogger(__name__)

FEATURES = ("stages", "units", "hast", "bn", "list")
FEATURE_MAPS = ("attention", "raw")
HIST_BINS = 20  # histogram of normalized entropies over [0, 1] in the record


# -- eq. 3-10 as functions of the FP probabilities -------------------------------------------
def self_entropy(probs: Tensor) -> Tensor:
    """eq. 3: -(1 / log N_c) * sum_c P(x, c) log P(x, c), per sample, in [0, 1]."""
    num_classes = probs.shape[1]
    return torch.special.entr(probs).sum(dim=1) / math.log(num_classes)


def threshold(epoch: int, epochs: int, t_low: float, t_high: float) -> float:
    """eq. 5: t = T_u - f_t(epoch) (T_u - T_l), f_t = epoch / (E - 1), 0-based epochs (T_u at
    the first epoch, T_l at the last; a single epoch uses T_u)."""
    frac = epoch / (epochs - 1) if epochs > 1 else 0.0
    return t_high - frac * (t_high - t_low)


def high_reliable(entropy: Tensor, t: float) -> Tensor:
    """eq. 4: the mask of the high-reliable samples, H_self(x) <= t."""
    return entropy <= t


def major_labels(probs: Tensor) -> Tensor:
    """eq. 6: the FP model's argmax."""
    return probs.argmax(dim=1)


def auxiliary_labels(probs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """eq. 8 and 10: (primary label, secondary label, lambda_p, lambda_s); the two weights are the
    FP probabilities of the two labels renormalized to sum to 1."""
    top, idx = probs.topk(2, dim=1)
    norm = top.sum(dim=1)
    return idx[:, 0], idx[:, 1], top[:, 0] / norm, top[:, 1] / norm


class ReliabilitySchedule:
    """The threshold of eq. 5 for every refinement step: epoch = stream images seen / set size."""

    def __init__(self, t_low: float, t_high: float, steps: int, batch_size: int, num_images: int) -> None:
        if num_images < 1:
            raise ConfigError("refine=plf: the calibration set is empty; there is nothing to score")
        self.t_low, self.t_high = float(t_low), float(t_high)
        self.batch_size, self.num_images = int(batch_size), int(num_images)
        self.epochs = max(1, math.ceil(steps * batch_size / num_images))

    def epoch(self, step: int) -> int:
        """0-based epoch of 1-based ``step`` (the epoch its first image belongs to)."""
        return min(self.epochs - 1, (step - 1) * self.batch_size // self.num_images)

    def threshold(self, step: int) -> float:
        return threshold(self.epoch(step), self.epochs, self.t_low, self.t_high)

    def thresholds(self) -> list[float]:
        return [threshold(e, self.epochs, self.t_low, self.t_high) for e in range(self.epochs)]


# -- loss terms --------------------------------------------------------------------------------
class _Scheduled(LossTerm):
    """A term whose split depends on the epoch: the schedule is built in :meth:`setup`."""

    def __init__(self, cfg: RefineConfig) -> None:
        super().__init__(cfg)
        self.schedule: Optional[ReliabilitySchedule] = None

    def setup(self, plan: RefinePlan) -> None:
        p = self.cfg.plf
        self.schedule = ReliabilitySchedule(p.t_low, p.t_high, plan.steps, plan.batch_size, plan.num_images)

    def split(self, out: StepOutputs) -> tuple[Tensor, Tensor]:
        """(FP probabilities, high-reliable mask) of this step's batch."""
        if self.schedule is None or out.step is None:
            raise RuntimeError(f"refine loss {self.name!r} needs the distillation stage's step "
                               f"counter (refine=kd or refine=plf)")
        probs = F.softmax(out.teacher_logits.detach().float(), dim=1)
        return probs, high_reliable(self_entropy(probs), self.schedule.threshold(out.step))


@term("plf_high")
class HighReliableCE(_Scheduled):
    """eq. 7: CE of the quantized model to the major pseudo-label, mean over high-reliable samples."""

    def __call__(self, out: StepOutputs) -> Tensor:
        probs, high = self.split(out)
        if not bool(high.any()):
            return out.student_logits.sum() * 0.0
        return F.cross_entropy(out.student_logits[high], major_labels(probs[high]))


@term("plf_low")
class LowReliableCE(_Scheduled):
    """eq. 9: lambda_p CE(primary) + lambda_s CE(secondary), mean over low-reliable samples."""

    def __call__(self, out: StepOutputs) -> Tensor:
        probs, high = self.split(out)
        low = ~high
        if not bool(low.any()):
            return out.student_logits.sum() * 0.0
        primary, secondary, lam_p, lam_s = auxiliary_labels(probs[low])
        logits = out.student_logits[low]
        ce_p = F.cross_entropy(logits, primary, reduction="none")
        ce_s = F.cross_entropy(logits, secondary, reduction="none")
        return (lam_p * ce_p + lam_s * ce_s).mean()


def stage_modules(model: nn.Module) -> list[str]:
    """The stage containers (pytorchcv ``features.stage<k>``, torchvision ``layer<k>``), in
    forward order."""
    names = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Sequential) and ((last.startswith("stage") and last[5:].isdigit()) or
                                                   (last.startswith("layer") and last[5:].isdigit())):
            names.append(name)
    return names


def unit_modules(model: nn.Module) -> list[str]:
    """The residual / inverted-residual units: the children of every stage container."""
    modules = dict(model.named_modules())
    return [f"{stage}.{child}" for stage in stage_modules(model)
            for child, _ in modules[stage].named_children()]


# HAST's hooks (lihuantong/HAST trainer_direct.py): pytorchcv block class -> the hooked child
HAST_HOOKS = {"ResUnit": "body", "DwsConvBlock": "pw_conv.bn", "LinearBottleneck": "conv3"}


def hast_modules(model: nn.Module) -> list[str]:
    """HAST's layer set: the output of every pytorchcv ``ResUnit``'s ``body`` (before the residual
    add and the activation; 9 on resnet20), ``DwsConvBlock``'s pointwise BN (before its ReLU) and
    ``LinearBottleneck``'s ``conv3`` (before the residual add), in forward order. A model with none
    of these blocks (torchvision's, mobilenetv3's) falls back to its units' outputs (``units``)."""
    modules = dict(model.named_modules())
    names = []
    for name, module in modules.items():
        child = HAST_HOOKS.get(type(module).__name__)
        if child is not None and f"{name}.{child}" in modules:
            names.append(f"{name}.{child}")
    return names or unit_modules(model)


def channel_attention(x: Tensor) -> Tensor:
    """normalize(mean_hw(x^2)) per sample: the channel-energy map HAST's code aligns
    (``channel_attention`` in its trainer; IntraQ has no feature term)."""
    energy = x.pow(2).mean(dim=(2, 3)) if x.dim() == 4 else x.pow(2)
    return F.normalize(energy.flatten(1), dim=1)


def bn_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def feature_modules(cfg: RefineConfig, student: nn.Module, teacher: nn.Module) -> list[str]:
    """The module paths eq. 13 compares, per ``refine.plf.features``; each exists in both models."""
    kind = cfg.plf.features
    if kind == "list":
        names = list(cfg.feature_modules)
    elif kind == "stages":
        names = stage_modules(teacher)
    elif kind == "units":
        names = unit_modules(teacher)
    elif kind == "hast":
        names = hast_modules(teacher)
    else:
        names = bn_modules(teacher)
    student_names = {n for n, _ in student.named_modules()}
    missing = [n for n in names if n not in student_names]
    if missing:
        raise ConfigError(f"refine.plf.features={kind}: {missing[:3]} are not modules of the quantized "
                          f"model (a preset that folds BN has no BN outputs: use features=units)")
    if not names:
        raise ConfigError(f"refine.plf.features={kind} finds no module in {type(teacher).__name__}; "
                          f"use features=list with refine.feature_modules=[...]")
    return names


@term("plf_mse")
class FeatureMSE(LossTerm):
    """eq. 13: sum over the hooked layers of the MSE between FP and quantized features (their
    channel attention by default, ``refine.plf.feature_map``)."""

    def setup(self, plan: RefinePlan) -> None:
        self.feature_modules = tuple(feature_modules(self.cfg, plan.student, plan.teacher))
        self.transform = channel_attention if self.cfg.plf.feature_map == "attention" else (lambda x: x)

    def __call__(self, out: StepOutputs) -> Tensor:
        return torch.stack([F.mse_loss(self.transform(out.student_features[name]),
                                       self.transform(out.teacher_features[name]))
                            for name in self.feature_modules]).sum()


def plf_weights(cfg: RefineConfig) -> dict[str, float]:
    """eq. 11, 12, 15 as term weights: tau * [use_high], tau * beta * [use_low], tau * mu."""
    p = cfg.plf
    tau = float(p.tau)
    return {"plf_high": tau * float(bool(p.use_high)), "plf_low": tau * float(p.beta) * float(bool(p.use_low)),
            "plf_mse": tau * float(p.mu)}


# -- the record --------------------------------------------------------------------------------
@torch.no_grad()
def reliability_record(teacher: nn.Module, images: Tensor, schedule: ReliabilitySchedule,
                       device: torch.device, batch_size: int = 256) -> dict[str, Any]:
    """One FP pass over the set: the entropy histogram, and per epoch the threshold and the
    high/low split sizes (the set is the same every epoch; only t moves)."""
    with eval_mode(teacher):
        entropies = []
        for start in range(0, images.shape[0], batch_size):
            logits = teacher(images[start:start + batch_size].to(device))
            entropies.append(self_entropy(F.softmax(logits.float(), dim=1)).cpu())
    ent = torch.cat(entropies)
    counts = torch.histc(ent, bins=HIST_BINS, min=0.0, max=1.0)
    thresholds = schedule.thresholds()
    high = [int(high_reliable(ent, t).sum()) for t in thresholds]
    return {
        "epochs": schedule.epochs,
        "threshold_per_epoch": [round(t, 6) for t in thresholds],
        "high_per_epoch": high,
        "low_per_epoch": [int(ent.numel()) - h for h in high],
        "entropy_hist": {"bin_edges": [i / HIST_BINS for i in range(HIST_BINS + 1)],
                         "counts": [int(c) for c in counts.tolist()]},
        "entropy_mean": float(ent.mean()),
        "entropy_median": float(ent.median()),
    }


def check_stream(strategy: Strategy) -> None:
    """PLF scores a fixed set of images with the FP model: a strategy whose stream is a generator
    (fresh images every step, no set to score once) has no logits source for it."""
    if strategy.streams_fresh_images:
        raise ConfigError(f"refine=plf scores a fixed image set once with the FP model, but strategy="
                          f"{strategy.name} streams fresh generator images every step (no fixed set, "
                          f"no logits source to filter); use refine=kd or that strategy's own refine")


def validate(cfg: RunConfig) -> None:
    """refine=plf's options (called by refine.validate before any work)."""
    # strategy=plf routes its strategy.* keys here: name the key the user set
    check_plf_values("strategy" if cfg.strategy.name == "plf" else "refine.plf", cfg.refine.plf)
    check_choice("refine.plf.features", cfg.refine.plf.features, FEATURES)
    check_choice("refine.plf.feature_map", cfg.refine.plf.feature_map, FEATURE_MAPS)
    if cfg.refine.plf.features == "list" and not cfg.refine.feature_modules:
        raise ConfigError("refine.plf.features=list needs refine.feature_modules: the module paths "
                          "whose FP and quantized outputs eq. 13 compares")

