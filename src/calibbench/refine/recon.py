"""Reconstruction refiners: AdaRound (layers), BRECQ (blocks), QDrop (blocks + dropped activations).

The calibration images teach each *unit* (``units.py``: a conv/linear, or a block) how its weights
round, one unit after the other in execution order:

- **input**: what the quantized model feeds the unit on the calibration images, with every unit
  before it already reconstructed (hard-rounded, its learned activation grid installed);
- **target**: the unit's output with quantization switched off in the same model (the FP model,
  BN folded exactly as the quantized one when the preset folds);
- **inside the unit**: weights use learned rounding (``quant/adaround.py``), activation quantizers
  are active, their ranges optionally learned (``learn_act``, LSQ-style, ``quant/learned.py``), and with
  ``drop_prob > 0`` (QDrop) each activation quantizer's output — and, as in the QDrop code, the
  unit's input, which the previous unit's quantizer produced — is replaced element-wise by its
  float value with probability ``drop_prob``;
- **loss**: ``Σ_channels (out − target)²`` averaged over batch and positions (the BRECQ/QDrop
  code's ``lp_loss``; ``round_lambda = 0.01`` is balanced against this scale), optionally weighted
  element-wise by BRECQ's Fisher diagonal (``fisher``), plus ``λ·Σ(1 − |2h − 1|^β)`` after a
  warm-up, β annealed linearly from ``beta[0]`` to ``beta[1]``;
- at the end of the unit every rounding is made hard and activation grids are written back.

Only one unit's tensors exist at a time: its inputs, targets (and float inputs / Fisher weights)
over the calibration images, cached on the device when they fit in ``cache_mb``, otherwise
recomputed batch by batch from the images at every step (:class:`StreamedUnitData`).

Where the pieces live: the quantizer side in ``quant/`` — the activation-quantizer wrapper
(``quant/unit_act.py``: :class:`UnitActQuantizer`, wrap/unwrap), QDrop's mask and mixing kernel
(``quant/drop.py``), the quantization-off switches (``quant/switches.py``), learned steps
(``quant/learned.py``); what is read from the models (inputs, targets, Fisher gradients, the
unit's cached or streamed data) in ``capture.py``; the stages, the per-unit loop and the refiners
here.

Why a plain loop and not Lightning (as ``refine=kd``): a resnet20 run is ~11 units × 2,000 steps of
a few milliseconds each; a Trainer per unit would add its setup and per-step hooks (the
``benchmarks/recon_cost.py`` ratio) to a step that is itself tiny, and its callbacks, loggers and
device handling give nothing here — the unit's data already lives in memory on the device, there
is one optimizer pair and no validation. The optimizer is built by the refinement stage's
``build_optimizer`` (``refine.optimizer``, ``refine.lr``), the record has the stage's fields.

Fisher (``fisher=true``): BRECQ weights the squared error of each element of the block output by
the squared gradient of the loss w.r.t. that element. Here: the gradient of the FP model's
cross-entropy to its own prediction (the only label every strategy has; synthetic sets have none)
w.r.t. the FP unit output, per image (summed loss), squared and divided by its mean over the unit's
calibration data, so the weights average 1 and ``round_lambda`` keeps its balance. (The BRECQ code
uses a KL between the partially quantized and the FP model and ``(|g| + 1)²``; this is the paper's
reading with the normalisation named here.)
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

from calibbench.config import ConfigError, RunConfig, check_choice
from calibbench.quant import QuantConv2d, QuantLinear, mse_init, quantizers
from calibbench.quant.adaround import AdaRound, attach
from calibbench.quant.drop import bernoulli_mask, mix_
from calibbench.quant.learned import LearnedStepQuantizer, learned_act_steps
from calibbench.quant.switches import activations_off, quantization_off
from calibbench.quant.unit_act import unwrap_acts, wrap_acts
from calibbench.refine import Refiner, build_optimizer, empty_record, refine_record, register
from calibbench.refine.capture import CachedUnitData, StreamedUnitData, UnitData, unit_data_bytes
from calibbench.refine.guard import LossGuard, check_unit, factors
from calibbench.refine.units import GRANULARITIES, Unit, build_units
from calibbench.seeding import stream_seed

if TYPE_CHECKING:  # strategies/ imports refine/: annotations only
    from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext
    from calibbench.tracking import Tracker

log = logging.getLogger(__name__)

REQUIRED = ("granularity", "drop_prob", "fisher", "learn_act", "act_lr", "round_lambda", "beta",
            "warmup", "cache_mb", "init", "procedure", "learn_zero_point")
INITS = ("mse", "calibrated")
PROCEDURES = ("joint", "two_stage")
ACT_INPUTS = ("float", "quantized")
SOURCES = ("calibration", "generator")


# -- validation ----------------------------------------------------------------------------------
def check_config(cfg: Any) -> None:
    """Every reconstruction option of the run config ``cfg``: one ConfigError before any work."""
    r = cfg.refine
    missing = [k for k in REQUIRED if getattr(r, k, None) is None]
    if missing:
        raise ConfigError(f"refine={r.name} needs {', '.join('refine.' + k for k in missing)} "
                          f"(set in conf/refine/{r.name}.yaml)")
    check_choice("refine.granularity", r.granularity, GRANULARITIES)
    if not 0.0 <= float(r.drop_prob) <= 1.0:
        raise ConfigError(f"refine.drop_prob={r.drop_prob} is out of range; valid: a probability in [0, 1]")
    if r.iterations is not None and int(r.iterations) < 0:
        raise ConfigError(f"refine.iterations={r.iterations} is out of range: iterations per unit, "
                          f"must be >= 0 (or null: budget.refine_unit_steps)")
    steps = cfg.budget.refine_unit_steps
    if steps is None or int(steps) < 0:
        raise ConfigError(f"budget.refine_unit_steps={steps} is out of range: must be >= 0")
    if float(r.round_lambda) < 0:
        raise ConfigError(f"refine.round_lambda={r.round_lambda} must be >= 0 (the rounding regulariser's weight)")
    beta = list(r.beta)
    if len(beta) != 2 or not all(float(b) > 0 for b in beta):
        raise ConfigError(f"refine.beta={beta} must be [start, end], both > 0 (e.g. [20, 2])")
    if not 0.0 <= float(r.warmup) < 1.0:
        raise ConfigError(f"refine.warmup={r.warmup} must be in [0, 1): the share of iterations "
                          f"before the rounding regulariser starts")
    if not float(r.act_lr) > 0:
        raise ConfigError(f"refine.act_lr={r.act_lr} must be > 0")
    check_choice("refine.init", r.init, INITS)
    check_choice("refine.procedure", r.procedure, PROCEDURES)
    check_choice("refine.act_input", r.act_input or "float", ACT_INPUTS)
    check_choice("refine.source", r.source or "calibration", SOURCES)
    if r.p is not None and not float(r.p) > 0:
        raise ConfigError(f"refine.p={r.p} must be > 0 (the Lp exponent of the activation stage)")
    if r.act_iterations is not None and int(r.act_iterations) < 0:
        raise ConfigError(f"refine.act_iterations={r.act_iterations} is out of range: must be >= 0 "
                          f"(or null: budget.refine_act_steps)")
    if int(cfg.budget.refine_act_steps) < 0:
        raise ConfigError(f"budget.refine_act_steps={cfg.budget.refine_act_steps} is out of range: must be >= 0")
    if r.procedure == "two_stage" and float(r.drop_prob) > 0:
        raise ConfigError(f"refine.procedure=two_stage (BRECQ) reconstructs the rounding with activation "
                          f"quantization off, so there is nothing to drop; refine.drop_prob={r.drop_prob} "
                          f"needs refine.procedure=joint (QDrop)")
    if not float(r.cache_mb) > 0:
        raise ConfigError(f"refine.cache_mb={r.cache_mb} must be > 0 (MB of unit data kept in memory)")
    if r.bn != "frozen":
        raise ConfigError(f"refine={r.name} reconstructs with BN in eval mode; refine.bn={r.bn!r} "
                          f"is not supported (valid: frozen)")
    if int(cfg.budget.refine_unit_batch_size) < 1 or (r.batch_size is not None and int(r.batch_size) < 1):
        raise ConfigError("the reconstruction batch (refine.batch_size or budget.refine_unit_batch_size) "
                          "must be >= 1")


# -- the loss ------------------------------------------------------------------------------------
def recon_loss(out: Tensor, target: Tensor, weight: Optional[Tensor] = None, p: float = 2.0) -> Tensor:
    """``Σ_channels |out − target|^p`` (× Fisher weight), mean over batch and positions (the
    references' ``lp_loss``: p = 2 for the rounding, BRECQ's p = 2.4 for its activation stage)."""
    err = (out - target).pow(2) if p == 2.0 else (out - target).abs().pow(p)
    if weight is not None:
        err = err * weight
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


def beta_at(step: int, steps: int, warmup_steps: int, beta: tuple[float, float]) -> float:
    """Linear anneal from ``beta[0]`` at the end of the warm-up to ``beta[1]`` at the last step."""
    start, end = beta
    span = max(1, steps - warmup_steps)
    rel = min(1.0, max(0.0, (step - warmup_steps) / span))
    return end + (start - end) * (1.0 - rel)


@torch.no_grad()
def unit_loss(unit: Unit, modules: list[nn.Module], data: UnitData, p: float = 2.0) -> float:
    """The unit's reconstruction loss on all its calibration data (no dropping, mean over batches
    weighted by their size)."""
    total, n = 0.0, 0
    for q_in, _, target, weight in data.batches():
        out = unit.run(modules, q_in)
        total += float(recon_loss(out, target, weight, p)) * q_in.shape[0]
        n += q_in.shape[0]
    return total / max(1, n)


# -- one unit ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What one pass over the units learns. ``weights``: the rounding (and, in the joint procedure,
    the activation steps); ``activations`` (BRECQ's second stage): the activation steps alone."""

    name: str  # weights | activations
    steps: int  # iterations per unit
    rounding: bool  # learn the weights' rounding (AdaRound's V)
    learn_act: bool  # learn the activation step sizes inside the unit
    act_lr: float
    drop: float  # QDrop's drop probability
    p: float = 2.0  # Lp exponent of the reconstruction loss
    input_float: bool = False  # the unit's input from the FP model instead of the quantized one
    fisher: bool = False


def stages_for(cfg: Any, budget: Any, steps: int) -> list[Stage]:
    """The stages of ``refine.procedure``: joint (AdaRound, QDrop) or two_stage (BRECQ)."""
    if cfg.procedure == "joint":
        return [Stage("weights", steps, True, bool(cfg.learn_act), float(cfg.act_lr), float(cfg.drop_prob),
                      fisher=bool(cfg.fisher))]
    act_steps = int(cfg.act_iterations if cfg.act_iterations is not None else budget.refine_act_steps)
    return [Stage("weights", steps, True, False, float(cfg.act_lr), 0.0, fisher=bool(cfg.fisher)),
            Stage("activations", act_steps if cfg.learn_act else 0, False, bool(cfg.learn_act),
                  float(cfg.act_lr), 0.0, float(cfg.p if cfg.p is not None else 2.4),
                  input_float=(cfg.act_input or "float") == "float")]


def _joint(cfg: Any, steps: int) -> Stage:
    return stages_for(cfg, None, steps)[0] if cfg.procedure == "joint" else \
        Stage("weights", steps, True, False, float(cfg.act_lr), 0.0, fisher=bool(cfg.fisher))


class UnitTrainer:
    """The optimisation of one unit in one stage: learned rounding attached to its layers
    (``stage.rounding``), activation quantizers wrapped (QDrop dropping; learned step sizes with
    ``stage.learn_act``), the optimizer. :meth:`step` is one iteration; :meth:`close` hardens the
    rounding and puts the quantizers back (learned steps written into them). A context manager."""

    def __init__(self, model: nn.Module, unit: Unit, data: UnitData, cfg: Any, stage: Stage,
                 batch_size: int, generator: torch.Generator, name: str, guard_factor: float = 1000.0
                 ) -> None:
        # the reconstruction term only: the rounding regulariser is bounded (<= lambda x #weights)
        # and jumps by design when it switches on after the warm-up
        self.guard = LossGuard(f"refine={name} unit {unit.name!r} ({unit.kind}, {stage.name})", guard_factor,
                               int(stage.steps), f"lower refine.lr (now {cfg.lr})")
        self.unit, self.data, self.steps, self.batch_size = unit, data, int(stage.steps), int(batch_size)
        self.stage, self.generator, self.name = stage, generator, name
        self.modules = unit.modules(model)
        self.drop = float(stage.drop)
        self.layers = [m for m in unit.layers(model) if isinstance(m, (QuantConv2d, QuantLinear))
                       and m.weight_quantizer.active]
        self.roundings: list[AdaRound] = [attach(layer) for layer in self.layers] if stage.rounding else []
        self.beta = (float(cfg.beta[0]), float(cfg.beta[1]))
        self.warm = int(float(cfg.warmup) * self.steps)
        self.lam = float(cfg.round_lambda)
        self._stack = ExitStack()
        holder = nn.ModuleList(self.modules)  # a view: the modules stay where they are in the model
        self.learned: list[LearnedStepQuantizer] = (
            self._stack.enter_context(learned_act_steps(holder, bool(cfg.learn_zero_point)))
            if stage.learn_act else [])
        self._stack.callback(unwrap_acts, wrap_acts(self.modules, self.drop))
        act_params = [p for q in self.learned for p in q.parameters_to_learn()]
        groups = [{"params": [r.V for r in self.roundings], "lr": float(cfg.lr)}] if self.roundings else []
        if act_params:
            groups.append({"params": act_params, "lr": float(stage.act_lr)})
        self.opt = build_optimizer(groups, cfg) if groups else None
        # V at a constant rate (the reference code's Adam); activation steps cosine-annealed to 0.
        total = max(1, self.steps)
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
        lambdas = ([lambda s: 1.0] if self.roundings else []) + ([cosine] if act_params else [])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambdas) if self.opt is not None else None

    @property
    def trains(self) -> bool:
        return self.opt is not None

    def __enter__(self) -> "UnitTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def step(self, it: int) -> float:
        """One iteration (0-based ``it``): a random batch, loss, backward, optimizer step."""
        if self.opt is None or self.sched is None:  # callers check `trains` first
            raise RuntimeError(f"refine={self.name}: unit {self.unit.name!r} has nothing to train")
        idx = torch.randperm(len(self.data.images), generator=self.generator)[:self.batch_size]
        q_in, fp_in, target, weight = self.data.get(idx)
        if fp_in is not None:  # QDrop: the input the previous quantizer produced, dropped too
            q_in = mix_(q_in, fp_in, bernoulli_mask(q_in, 1.0 - self.drop))  # get() gave a fresh q_in
        out = self.unit.run(self.modules, q_in)
        total = recon_loss(out, target, weight, self.stage.p)
        recon = float(total.detach())
        if it >= self.warm and self.lam > 0 and self.roundings:
            b = beta_at(it, self.steps, self.warm, self.beta)
            total = total + self.lam * sum(r.regularizer(b) for r in self.roundings)
        value = float(total.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"refine={self.name}: the loss is {value} in unit {self.unit.name!r} "
                               f"({self.unit.kind}) at iteration {it + 1} of {self.steps}; stopping")
        self.guard.check({"recon": recon}, it + 1)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.sched.step()
        return value

    def close(self) -> None:
        for r in self.roundings:
            r.harden()
        self._stack.close()


def reconstruct_unit(model: nn.Module, unit: Unit, images: Tensor, cfg: Any, steps: int,
                     batch_size: int, device: torch.device, generator: torch.Generator,
                     name: str, stage: Optional[Stage] = None, sampler: Any = None,
                     guard: Any = None) -> dict[str, Any]:
    """Learn the rounding (and/or activation steps) of one unit in place; its record. ``stage``
    defaults to the first stage of ``refine.procedure`` with ``steps`` iterations."""
    start = time.perf_counter()
    stage = stage if stage is not None else _joint(cfg, steps)
    data = unit_data(model, unit, images, cfg, batch_size, device, stage, sampler)
    modules = unit.modules(model)
    loss_start = unit_loss(unit, modules, data, stage.p)
    losses = []
    factor, unit_factor = factors(guard)
    with UnitTrainer(model, unit, data, cfg, stage, batch_size, generator, name, factor) as trainer:
        if trainer.trains:
            for it in range(stage.steps):
                losses.append(trainer.step(it))
    # hard rounding; dropping wrappers removed, learned steps written back into the quantizers
    changed = [r.changed() for r in trainer.roundings]
    loss_end = unit_loss(unit, modules, data, stage.p)
    if losses:
        check_unit(f"refine={name}", unit.name, loss_start, loss_end, unit_factor,
                   f"lower refine.lr (now {cfg.lr})")
    flipped = sum(c[0] for c in changed)
    total_w = sum(m.weight.numel() for m in trainer.layers)
    return {"unit": unit.name, "kind": unit.kind, "modules": list(unit.paths), "stage": stage.name,
            "layers": len(trainer.layers), "weights": total_w, "iterations": len(losses),
            "cached": isinstance(data, CachedUnitData), "loss_start": loss_start, "loss_end": loss_end,
            "loss_first_step": losses[0] if losses else None, "loss_last_step": losses[-1] if losses else None,
            "changed_share": flipped / total_w if total_w and stage.rounding else 0.0, "changed": flipped,
            "act_quantizers": len(trainer.learned), "seconds": round(time.perf_counter() - start, 3)}


def unit_data(model: nn.Module, unit: Unit, images: Tensor, cfg: Any, batch_size: int,
              device: torch.device, stage: Optional[Stage] = None, sampler: Any = None) -> UnitData:
    """The unit's data: cached when it fits in ``cache_mb`` (and no fresh batches are drawn),
    else streamed."""
    stage = stage if stage is not None else _joint(cfg, 0)
    modules = unit.modules(model)
    drop, fisher = stage.drop > 0, stage.fisher
    need = unit_data_bytes(model, unit, modules, images[:1].to(device), len(images), drop, fisher)
    cached = sampler is None and need <= float(cfg.cache_mb) * 2**20
    cls = CachedUnitData if cached else StreamedUnitData
    return cls(model, modules[0], modules[-1], images, device, max(batch_size, 64), drop, fisher,
               input_float=stage.input_float, sampler=sampler)


def act_steps(model: nn.Module) -> dict[str, float]:
    """``{quantizer path: step size}`` of every active per-tensor activation quantizer."""
    return {path: float(q.scale.reshape(-1)[0]) for path, kind, q in quantizers(model)
            if kind != "weight" and q.active and q.ch_axis is None}


# -- the refiner ---------------------------------------------------------------------------------
def reconstruct(qmodel: nn.Module, images: Tensor, ctx: Any, cfg: Any, name: str, track: Any = None,
                sampler: Any = None) -> dict[str, Any]:
    """Reconstruct every unit of ``qmodel`` (calibrated fake-quant model) on ``images`` (or, with
    ``sampler``, on fresh images drawn per iteration), stage after stage; the record."""
    steps = int(cfg.iterations if cfg.iterations is not None else ctx.budget.refine_unit_steps)
    batch_size = int(cfg.batch_size or ctx.budget.refine_unit_batch_size)
    device = torch.device(ctx.device)
    start = time.perf_counter()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    flags = [p.requires_grad for p in qmodel.parameters()]
    was_training = qmodel.training
    stages = stages_for(cfg, ctx.budget, steps)
    records: dict[str, list[dict[str, Any]]] = {stage.name: [] for stage in stages}
    stage_records: list[dict[str, Any]] = []
    init: dict[str, Any] = {"name": str(cfg.init)}
    try:
        with torch.inference_mode(False), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(stream_seed(ctx.seed, "refine/recon"))  # QDrop's masks
            order = torch.Generator().manual_seed(stream_seed(ctx.seed, "refine/recon/order"))
            if cfg.init == "mse":  # the references' grids: MSE search (quant/observers.py)
                t0 = time.perf_counter()
                init.update(mse_init(qmodel, images.split(int(ctx.budget.calib_batch_size)), device))
                init["seconds"] = round(time.perf_counter() - t0, 3)
            initial_steps = act_steps(qmodel)
            qmodel.eval()  # BN in eval mode (folded or frozen), as calibrated
            qmodel.requires_grad_(False)  # only the rounding and (learn_act) the steps train
            example = images[:1].to(device)
            with torch.no_grad(), quantization_off(qmodel):
                units, used = build_units(qmodel, str(cfg.granularity), example)
            log.info("refine=%s: %d %s units; stages %s", name, len(units), used,
                     ", ".join(f"{s.name} x {s.steps}" for s in stages))
            for stage in stages:
                t0 = time.perf_counter()
                with ExitStack() as scope:
                    if stage.name == "weights" and len(stages) > 1:
                        scope.enter_context(activations_off(qmodel))  # BRECQ: act_quant=False
                    for k, unit in enumerate(_progress(units, ctx.progress, f"{name}/{stage.name}")):
                        rec = reconstruct_unit(qmodel, unit, images, cfg, stage.steps, batch_size, device,
                                               order, name, stage, sampler,
                                               getattr(ctx, "guard", None))
                        records[stage.name].append(rec)
                        if track is not None:
                            track.log({"refine/unit": k, f"refine/{stage.name}/loss_start": rec["loss_start"],
                                       f"refine/{stage.name}/loss_end": rec["loss_end"],
                                       "refine/changed_share": rec["changed_share"]})
                        log.debug("%s unit %s: loss %.4g -> %.4g, %.1f%% changed, %.1f s", stage.name,
                                  unit.name, rec["loss_start"], rec["loss_end"], 100 * rec["changed_share"],
                                  rec["seconds"])
                recs = records[stage.name]
                stage_records.append({
                    "name": stage.name, "iterations": stage.steps,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "loss_first": sum(r["loss_start"] for r in recs), "loss_last": sum(r["loss_end"] for r in recs),
                    "p": stage.p, "learns": (["rounding"] if stage.rounding else [])
                    + (["act_steps"] if stage.learn_act else []),
                    "act_lr": stage.act_lr if stage.learn_act else None, "drop_prob": stage.drop,
                    "act_quant": not (stage.name == "weights" and len(stages) > 1),
                    "input": "float" if stage.input_float else "quantized"})
            final_steps = act_steps(qmodel)
    finally:
        for p, flag in zip(qmodel.parameters(), flags):
            p.requires_grad_(flag)
        qmodel.train(was_training)
    seconds = time.perf_counter() - start
    weight_recs = records["weights"]
    weights = sum(r["weights"] for r in weight_recs)
    changed = sum(r["changed"] for r in weight_recs)
    loss_start = stage_records[0]["loss_first"]
    loss_end = stage_records[-1]["loss_last"]
    log.info("refine=%s: %d units in %.1f s, summed unit loss %.4g -> %.4g, %.2f%% of weights rounded "
             "away from nearest", name, len(weight_recs), seconds, loss_start, loss_end,
             100 * changed / max(1, weights))
    total_steps = sum(s.steps * len(units) for s in stages)
    record = refine_record(
        total_steps, batch_size, total_steps * min(batch_size, len(images)), round(seconds, 3), loss_start,
        loss_end, {"recon": 1.0, "round": float(cfg.round_lambda)},
        {key: [r[key] for r in weight_recs] for key in ("loss_start", "loss_end", "changed_share")},
        granularity=used, units=weight_recs, iterations_per_unit=steps, stages=stage_records, init=init,
        act_steps={k: [v, final_steps.get(k, v)] for k, v in initial_steps.items()},
        source="generator" if sampler is not None else "calibration",
        weights=weights, changed=changed, changed_share=changed / weights if weights else 0.0)
    if "activations" in records:
        record["act_units"] = records["activations"]
    return record



def _progress(units: list[Unit], enabled: bool, name: str):  # noqa: ANN202
    if not enabled:
        return units
    from tqdm.auto import tqdm

    return tqdm(units, desc=f"refine={name}", unit="unit", leave=True)


class ReconRefiner(Refiner):
    """Unit-by-unit reconstruction of the rounding on the calibration set (options in the config)."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        check_config(cfg)

    def run(self, qmodel: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, track: Optional[Tracker] = None) -> dict[str, Any]:
        steps = self.cfg.iterations if self.cfg.iterations is not None else ctx.budget.refine_unit_steps
        if int(steps) == 0:
            return empty_record(units=[])
        sampler = generator_sampler(strategy, ctx, calib) if self.cfg.source == "generator" else None
        return reconstruct(qmodel, calib.images, ctx, self.cfg, self.cfg.name, track, sampler)


def generator_sampler(strategy: Any, ctx: Any, calib: Any) -> Any:
    """``n -> n fresh images`` from a generator strategy's warmed-up generator (the state it
    handed on with its calibration set), seeded by the run (``refine.source=generator``: Genie's
    data-free reconstruction on a generator's stream). The generator is not trained further:
    the strategy's declared ``sampler`` (``GeneratorStrategy.sampler``) reads the hand-over."""
    if not getattr(strategy, "trains_generator", False) or "generator" not in calib.state:
        raise ConfigError(f"refine.source=generator reconstructs on a generator strategy's images; "
                          f"strategy {getattr(strategy, 'name', strategy)!r} has no generator "
                          f"(use gdfq, fdda or clusterq, or refine.source=calibration)")
    return strategy.sampler(ctx, calib, torch.Generator().manual_seed(stream_seed(ctx.seed, "refine/recon/generator")))


@register("adaround")
class AdaRoundRefiner(ReconRefiner):
    """AdaRound: layer by layer, through each layer's BN and activation (``conf/refine/adaround.yaml``)."""


@register("brecq")
class BRECQRefiner(ReconRefiner):
    """BRECQ: block by block in two stages, the rounding with activation quantization off, then the
    activation step sizes alone (``conf/refine/brecq.yaml``)."""


@register("qdrop")
class QDropRefiner(ReconRefiner):
    """QDrop: BRECQ's blocks, rounding and activation steps in one stage, activation quantization
    dropped at 0.5 (``conf/refine/qdrop.yaml``); ``refine.drop_prob=0`` is the joint procedure
    without dropping (what ``refine=brecq`` ran before issue 21)."""
