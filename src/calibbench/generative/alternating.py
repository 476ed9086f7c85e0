"""Alternating training of a generator and the fake-quant student, on Lightning (manual optimization).

:class:`GenerativeModule` extends the ``refine=kd`` module family (:class:`~calibbench.refine.
distill.StudentModule`: student, frozen teacher, student loss terms, NaN check, optimizer) with a
second player, the conditional generator of a :class:`~calibbench.generative.strategy.
GeneratorStrategy`. Every step (one item of the strategy's ``generator_inputs`` stream):

1. **generator step**: ``images = G(z, y)``; the frozen FP teacher runs on them with a
   :class:`~calibbench.bnstats.BNStatsRecorder` on its BN layers (per-batch, and per-image when a
   term asks); every generator term (``strategy.losses``) is computed, checked for NaN (the error
   names the player ``generator``, the step and the term), and their weighted sum takes one Adam
   step. The teacher's parameters get no gradient (frozen); the gradient reaches G through the
   teacher's activations. Then ``strategy.update_state(state, outputs, step)`` under ``no_grad``.
2. **quantized-model step** (after ``warmup_steps`` generator-only steps, and only when there is a
   student): the student trains on the *detached* generated batch (plus the strategy's real batch,
   if any) with the refine config's terms (kd, ce, ...), optimizer and cosine schedule over the
   quantized-model steps; a NaN names the player ``quantized model``.

Every term of both players is in the step's row (``generator/<term>``, ``generator/loss``,
``generator/lr``; ``loss``, ``<term>``, ``lr`` of the quantized model), recorded by
:class:`CurveRecorder` as for ``refine=kd``. The run is bounded by batches (``manual=True`` in
:func:`trainer_kwargs`): with two optimizers Lightning's ``global_step`` counts both.

:func:`warm_up` runs the same module without a student (the calibration stage's generator
warm-up; the module has no refine config then: ``cfg=None``, which the student-only options
never read); :func:`train_alternating` is the refinement stage, continuing from the calibration
stage's :class:`~calibbench.generative.handover.GeneratorHandover`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler

from calibbench.bnstats import BNStatsRecorder, BNTargets
from calibbench.generative.handover import GeneratorHandover
from calibbench.generative.network import Generator
from calibbench.generative.terms import GenLossTerm, GenStepOutputs
from calibbench.refine import refine_record, stream
from calibbench.refine.distill import CurveRecorder, StudentModule, check_length, fit, training
from calibbench.refine.guard import factors
from calibbench.refine.losses import LossTerm, build_terms

log = logging.getLogger(__name__)

GENERATOR, STUDENT, WARMUP = "generator", "quantized model", "generator (warm-up)"


class GenerativeModule(StudentModule):
    """Generator + (optional) student + frozen teacher; two optimizers, manual optimization.
    ``cfg``: the refine config of the student's side (``None`` without a student)."""

    def __init__(self, student: Optional[nn.Module], teacher: nn.Module,
                 terms: Sequence[tuple[str, float, LossTerm]], cfg: Optional[Any], max_steps: int,
                 generator: Generator, gen_terms: Sequence[tuple[str, float, GenLossTerm]],
                 strategy: Any, layers: Sequence[tuple[str, _BatchNorm]], state: Optional[dict] = None,
                 warmup_steps: int = 0, range_params: Sequence[nn.Parameter] = (),
                 gen_optimizer_state: Optional[dict] = None, step_offset: int = 0) -> None:
        super().__init__(student, teacher, terms, cfg, max_steps, range_params)
        self.automatic_optimization = False
        self.generator = generator
        self.gen_terms = list(gen_terms)
        self._strategy = [strategy]  # a list: not a submodule, not a hyperparameter
        self.state = state if state is not None else {}
        self.warmup_steps = int(warmup_steps)
        self.schedule_steps = max(1, self.max_steps - self.warmup_steps)
        self.step_offset = int(step_offset)
        self.gen_optimizer_state = gen_optimizer_state
        per_image = any(t.per_image_stats for _, _, t in self.gen_terms)
        self.bn = BNStatsRecorder(teacher, layers=layers, per_image=per_image, per_batch=True,
                                  correction=strategy.bn_correction)
        self.targets: Optional[BNTargets] = None
        self.class_counts = torch.zeros(generator.num_classes, dtype=torch.long)
        self.images_generated = 0
        self.final_gen_optimizer_state: Optional[dict] = None

    @property
    def strategy(self) -> Any:
        return self._strategy[0]

    def on_fit_start(self) -> None:
        self.targets = self.bn.targets(self.device)

    def configure_optimizers(self) -> Any:
        gen_opt = self.strategy.optimizer(self.generator)
        if self.gen_optimizer_state is not None:
            gen_opt.load_state_dict(self.gen_optimizer_state)
        if self.student is None:
            return gen_opt
        opt, sched = self.student_optimizer()
        return [gen_opt, opt], [sched]

    def student_optimizer(self):  # noqa: ANN201 - cosine over the quantized-model steps only
        opt, _ = super().student_optimizer()
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.schedule_steps)

    def generator_step(self, z: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor, dict[str, float]]:
        """One generator update; returns (images, teacher logits) detached, and the row part."""
        opts = self.optimizers()
        gen_opt = opts[0] if isinstance(opts, list) else opts
        self.generator.train()
        with self.bn:
            self.bn.clear()
            images = self.generator(z, y)
            logits = self.teacher(images)
            if self.targets is None:  # set by on_fit_start
                raise RuntimeError("generator_step before on_fit_start: no BN targets")
            out = GenStepOutputs(images, y, logits, self.bn.batch_stats(), self.targets, step,
                                 self.bn.image_stats() if self.bn.per_image else None, self.state)
        self.clear_features()  # the teacher's feature hooks (feature term) fired on G's images
        values = {name: term(out) for name, _, term in self.gen_terms}
        detached = self.check_finite(values, step, GENERATOR if self.student is not None else WARMUP,
                                     self.gen_terms)
        total = self.weighted(values, self.gen_terms)
        gen_opt.zero_grad()
        self.manual_backward(total)
        gen_opt.step()
        with torch.no_grad():
            self.strategy.update_state(self.state, out, step)
        self.images_generated += int(images.shape[0])
        self.class_counts += torch.bincount(y.detach().cpu(), minlength=self.generator.num_classes)
        row = {f"generator/{name}": float(v) for name, v in zip(values, detached)}
        row["generator/loss"] = float(total.detach())
        row["generator/lr"] = float(gen_opt.param_groups[0]["lr"])
        return images.detach(), logits.detach(), row

    def student_step(self, images: Tensor, labels: Tensor, teacher_logits: Optional[Tensor],
                     step: int) -> dict[str, float]:
        opts, sched = self.optimizers(), self.lr_schedulers()
        if not isinstance(opts, list) or not isinstance(sched, LRScheduler):  # configure_optimizers: two + one
            raise RuntimeError("student_step needs the generator's and the student's optimizers and a schedule")
        _, opt = opts
        lr = float(opt.param_groups[0]["lr"])
        values = self.compute(images, labels, teacher_logits)
        detached = self.check_finite(values, step, STUDENT)
        total = self.weighted(values, self.terms)
        opt.zero_grad()
        self.manual_backward(total)
        opt.step()
        sched.step()
        self.images_seen += int(images.shape[0])
        return {"loss": float(total.detach()), **{n: float(v) for n, v in zip(values, detached)}, "lr": lr}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        step = self.step_offset + batch_idx + 1
        logits: Optional[Tensor]
        images, logits, row = self.generator_step(batch["z"], batch["y"], step)
        row = {"step": step, **row}
        if self.student is not None and step > self.warmup_steps:
            labels: Tensor = batch["y"]
            if "real_x" in batch:  # the strategy's real images join the synthetic batch
                images = torch.cat([images, batch["real_x"].to(images.dtype)])
                labels = torch.cat([labels, batch["real_y"].to(labels.dtype)])
                logits = None  # the teacher runs on the whole mixed batch
            row.update(self.student_step(images, labels, logits, step))
            self.log("loss", row["loss"], prog_bar=True, logger=False)
        self.log("g_loss", row["generator/loss"], prog_bar=True, logger=False)
        return {"row": row}

    def on_train_end(self) -> None:
        opts = self.optimizers()
        gen_opt = opts[0] if isinstance(opts, list) else opts
        self.final_gen_optimizer_state = copy.deepcopy(_to_cpu(gen_opt.optimizer.state_dict()))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _inputs(strategy: Any, ctx: Any, gen: Generator, batch_size: int, name: str) -> Any:
    """The strategy's ``generator_inputs`` stream as a loader (seeded by the run's ``name`` stream)."""
    rng = ctx.generator(name)
    make = lambda: strategy.generator_inputs(ctx, batch_size, gen.num_classes, gen.latent_dim, rng)  # noqa: E731
    return torch.utils.data.DataLoader(stream.BatchStream(make), batch_size=None, num_workers=0)


def warm_up(gen: Generator, teacher: nn.Module, strategy: Any, ctx: Any,
            layers: Sequence[tuple[str, _BatchNorm]], steps: int, batch_size: int) -> dict[str, Any]:
    """Train ``gen`` alone for ``steps`` steps (no student); its optimizer state, the strategy's
    state, per-class label counts, the thinned curve and the seconds."""
    state = strategy.setup_state(ctx, list(layers))
    counts = torch.zeros(gen.num_classes, dtype=torch.long)
    if steps == 0:
        opt_state = strategy.optimizer(gen).state_dict()
        return {"optimizer": opt_state, "state": state, "class_counts": counts, "curve": {}, "seconds": 0.0}
    start = time.perf_counter()
    recorder = CurveRecorder()
    with training(None, teacher, ctx, None, "generator/torch"):
        module = GenerativeModule(None, teacher, (), None, steps, gen, strategy.gen_terms(), strategy,
                                  layers, state, warmup_steps=steps)
        module.guard_factor = factors(getattr(ctx, "guard", None))[0]
        fit(module, _inputs(strategy, ctx, gen, batch_size, "generator/warmup"), ctx, steps, recorder,
            manual=True)
    gen.to(ctx.device)  # Lightning's teardown moves the module to the CPU
    check_length(recorder.rows, steps, strategy)
    log.info("generator warm-up: %d steps x %d images in %.1f s, loss %.4f -> %.4f", steps, batch_size,
             time.perf_counter() - start, recorder.rows[0]["generator/loss"], recorder.rows[-1]["generator/loss"])
    return {"optimizer": module.final_gen_optimizer_state, "state": _to_cpu(module.state),
            "class_counts": module.class_counts, "curve": recorder.curve(),
            "seconds": round(time.perf_counter() - start, 3)}


def train_alternating(student: nn.Module, teacher: nn.Module, strategy: Any, ctx: Any, calib: Any,
                      cfg: Any, steps: int, track: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refinement of a generator strategy: ``steps`` alternating steps continuing the generator
    warmed up in the calibration stage (its :class:`GeneratorHandover` in ``calib``); the
    ``refine`` record and the strategy's state at the end (on the device, as the last
    ``update_state`` left it)."""
    handover = GeneratorHandover.from_calibration(calib, f"refine={cfg.name} (strategy {strategy.name!r})")
    batch_size = int(ctx.budget.gen_batch_size)
    warmup = int(calib.info.get("warmup_steps", 0))
    layers = strategy.bn_layers(teacher)
    gen = strategy.build_generator(ctx)
    gen.load_state_dict(handover.generator)
    terms = build_terms(cfg)
    start = time.perf_counter()
    recorder = CurveRecorder(track)
    state = strategy.setup_state(ctx, list(layers))
    state.update(copy.deepcopy(handover.strategy_state))
    state = {k: (v.to(ctx.device) if isinstance(v, Tensor) else v) for k, v in state.items()}
    with training(student, teacher, ctx, cfg, "refine/torch") as range_params:
        module = GenerativeModule(student, teacher, terms, cfg, warmup + steps, gen, strategy.gen_terms(),
                                  strategy, layers, state, warmup_steps=warmup, range_params=range_params,
                                  gen_optimizer_state=handover.optimizer, step_offset=warmup)
        module.guard_factor = factors(getattr(ctx, "guard", None))[0]
        fit(module, _inputs(strategy, ctx, gen, batch_size, "refine/generator"), ctx, steps, recorder,
            manual=True)
    seconds = time.perf_counter() - start
    rows = recorder.rows
    check_length(rows, steps, strategy)
    log.info("refine: %d alternating steps x %d images in %.1f s, loss %.4f -> %.4f", steps, batch_size,
             seconds, rows[0]["loss"], rows[-1]["loss"])
    # every generated image's label: warm-up, the sampled calibration set, this stage
    before = handover.class_counts if handover.class_counts is not None \
        else torch.zeros(gen.num_classes, dtype=torch.long)
    counts = before + module.class_counts
    if calib.labels is not None:
        counts = counts + torch.bincount(calib.labels, minlength=gen.num_classes)
    record = refine_record(
        len(rows), batch_size, module.images_seen, round(seconds, 3), rows[0]["loss"], rows[-1]["loss"],
        {name: weight for name, weight, _ in terms}, recorder.curve(),
        generator_terms={name: w for name, w, _ in module.gen_terms}, warmup_steps=warmup,
        images_generated=module.images_generated,
        images_generated_total=int(calib.info.get("images_generated", 0)) + module.images_generated,
        per_class_counts=counts.tolist())
    return record, module.state
