"""Distillation of the FP teacher into the fake-quant student, on Lightning (``refine=kd``).

:class:`StudentModule` holds what every refinement module shares (the generator stage's
``calibbench.generative.alternating.GenerativeModule`` extends it too); :class:`DistillModule`
is ``refine=kd``'s. It owns the student (the calibrated fake-quant model; its weights train through the straight-through
estimator of ``quant/``), the frozen FP teacher and a list of weighted loss terms (``losses.py``).
Lightning runs the loop: optimizer and cosine schedule stepping, device placement, progress bar.
:class:`CurveRecorder` (a Callback) keeps every step's loss terms and learning rate for
``result.json`` and sends them to calibbench's own tracker (not Lightning's WandbLogger: DESIGN.md
pitfall 8).

What trains and what does not:
- student weights and biases (and BN affine parameters) always; the weight grid follows the
  weight (its per-channel min/max is recomputed whenever the weight changes, as in calibration);
- activation ranges: frozen at the calibrated grid (``act_ranges=frozen``, no gradient reaches
  it) or learned (``act_ranges=learned``, see ``quant/learned.py``);
- student BatchNorm: ``bn=frozen`` keeps BN layers in eval mode, so they normalise with, and never
  update, the running statistics computed on real data; ``bn=train`` uses batch statistics and
  updates the running ones (momentum as in the model);
- teacher: eval mode, no gradients, bit-identical afterwards.

State that must stay usable by autograd is never created under ``inference_mode``: the Trainer
runs with ``inference_mode=False`` and :func:`distill` itself runs inside
``torch.inference_mode(False)`` (DESIGN.md pitfall 7): :func:`training` (the surroundings of every
fit) and :func:`fit` (the Trainer) are shared with the alternating stage.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from calibbench.config import RefineConfig
from calibbench.quant.learned import learned_act_ranges
from calibbench.record import CURVE_POINTS, thin
from calibbench.refine import build_optimizer, refine_record, stream
from calibbench.refine.guard import LossGuard, factors
from calibbench.refine.losses import LossTerm, RefinePlan, StepOutputs, build_terms
from calibbench.seeding import stream_seed

if TYPE_CHECKING:  # strategies/ imports refine/: annotations only
    from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext
    from calibbench.tracking import Tracker

log = logging.getLogger(__name__)



class StudentModule(L.LightningModule):
    """What every refinement module shares: the student (the fake-quant model being trained), the
    frozen teacher, the student's weighted loss terms (with the forward hooks the feature term
    needs), the mode rules, the NaN check and the student's optimizer + cosine schedule.

    :class:`DistillModule` (``refine=kd``) trains it with Lightning's automatic optimization;
    ``calibbench.generative.alternating.GenerativeModule`` adds a second player (a generator)
    with manual optimization.
    Lightning (>= 2.5) keeps the train/eval mode the module has when ``fit`` starts, so the
    caller switches it with ``train()``, which leaves the teacher and frozen BN in eval mode.
    """

    def __init__(self, student: Optional[nn.Module], teacher: nn.Module,
                 terms: Sequence[tuple[str, float, LossTerm]], cfg: Optional[RefineConfig], max_steps: int,
                 range_params: Sequence[nn.Parameter] = ()) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.terms = list(terms)
        self.cfg = cfg
        self.max_steps = int(max_steps)
        self.range_params = list(range_params)
        self.images_seen = 0
        self.guard_factor = 1000.0  # guard.factor of the run (set by the caller)
        self._guards: dict[str, LossGuard] = {}
        self._features: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        self._hooks = []
        self.feature_names = sorted({m for _, _, t in self.terms for m in t.feature_modules})
        for role, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            modules = dict(model.named_modules())
            for name in self.feature_names:
                self._hooks.append(modules[name].register_forward_hook(self._recorder(role, name)))

    def _recorder(self, role: str, name: str) -> Callable[[nn.Module, tuple, Any], None]:
        store = self._features[role]

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"refine feature module {name!r} returns {type(output).__name__}, "
                                f"not a tensor; pick a module with a single tensor output")
            store[name] = output.clone()  # a later in-place op (ReLU(inplace)) must not change it

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def clear_features(self) -> None:
        for store in self._features.values():
            store.clear()  # the step's graph is not kept alive by the hooks' store

    def train(self, mode: bool = True) -> "StudentModule":
        """Lightning switches the whole module to train mode; teacher and frozen BN stay in eval."""
        super().train(mode)
        self.teacher.eval()
        if self.student is not None and self.cfg is not None and self.cfg.bn == "frozen":
            for module in self.student.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    @property
    def trained(self) -> nn.Module:
        """The student (a module without one, the generator warm-up, never trains or runs it)."""
        if self.student is None:
            raise RuntimeError("this training module has no student (generator warm-up)")
        return self.student

    def forward(self, x: Tensor) -> Tensor:
        return self.trained(x)

    def compute(self, images: Tensor, labels: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, step: Optional[int] = None
                ) -> dict[str, Tensor]:
        """Teacher forward (no grad; skipped when ``teacher_logits`` are given and no feature term
        needs the teacher's features), student forward, every term's value (unweighted)."""
        if teacher_logits is None or self.feature_names:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        student_logits = self.trained(images)
        out = StepOutputs(student_logits, teacher_logits, labels, dict(self._features["student"]),
                          dict(self._features["teacher"]), step)
        self.clear_features()
        return {name: term(out) for name, _, term in self.terms}

    def weighted(self, values: dict[str, Tensor], terms: Sequence[tuple[str, float, Any]]) -> Tensor:
        # sum() starts at the int 0; the terms are tensors, so the result is one
        return sum(weight * values[name] for name, weight, _ in terms)  # type: ignore[return-value]

    def check_finite(self, values: dict[str, Tensor], step: int, player: str = "",
                     terms: Optional[Sequence[tuple[str, float, Any]]] = None) -> Tensor:
        """The detached values stacked, after the player's :class:`~calibbench.refine.guard.LossGuard`
        checked them: a FloatingPointError naming the player (when there are two), the term(s) and
        the step when any is NaN/inf, a DivergenceError when the weighted total (``terms``' weights,
        default the student's) grew past ``guard_factor`` × its first value."""
        detached = torch.stack([v.detach() for v in values.values()])
        floats = {name: float(v) for name, v in zip(values, detached)}
        guard = self._guards.get(player)
        if guard is None:
            generator = player.startswith("generator")
            stage = player or f"refine={getattr(self.cfg, 'name', 'kd')}"
            hint = ("lower strategy.lr (the generator's learning rate)" if generator
                    else f"lower refine.lr (now {getattr(self.cfg, 'lr', '?')})")
            guard = self._guards[player] = LossGuard(stage, self.guard_factor, self.max_steps, hint)
        weights = {name: w for name, w, _ in (self.terms if terms is None else terms)}
        total = sum(weights.get(name, 1.0) * v for name, v in floats.items() if math.isfinite(v))
        guard.check(floats, step, total)
        return detached

    def student_optimizer(self) -> tuple[torch.optim.Optimizer, LRScheduler]:
        """The student's optimizer (refine.optimizer, lr, weight decay; activation ranges without
        weight decay) and its cosine schedule over ``max_steps``."""
        cfg = self.cfg
        if cfg is None:  # only the generator warm-up has no student config, and no student
            raise RuntimeError("student_optimizer() needs the refine config (none: a warm-up)")
        ranges = {id(p) for p in self.range_params}
        weights = [p for p in self.trained.parameters() if p.requires_grad and id(p) not in ranges]
        groups = [{"params": weights, "weight_decay": float(cfg.weight_decay)}]
        if self.range_params:
            groups.append({"params": self.range_params, "weight_decay": 0.0})
        opt = build_optimizer(groups, cfg)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_steps))
        return opt, sched


class DistillModule(StudentModule):
    """Student + frozen teacher + weighted loss terms; one ``training_step`` per stream batch."""

    def training_step(self, batch: tuple[Tensor, Optional[Tensor]], batch_idx: int) -> dict[str, Any]:
        images, labels = batch
        step = self.global_step + 1
        values = self.compute(images, labels, step=step)
        total = self.weighted(values, self.terms)
        detached = self.check_finite(values, step)
        lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.images_seen += int(images.shape[0])
        self.log("loss", total.detach(), prog_bar=True, logger=False)
        self.log("lr", lr, prog_bar=True, logger=False)
        row = {"step": step, "loss": float(total.detach()),
               **{name: float(v) for name, v in zip(values, detached)}, "lr": lr}
        return {"loss": total, "row": row}

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        opt, sched = self.student_optimizer()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CurveRecorder(L.Callback):
    """Every step's row (``training_step`` returns ``{"row": {"step", "loss", <terms>, "lr", ...}}``):
    kept for the record and sent to the tracker. Rows may differ in their columns (a generator
    warm-up step has no quantized-model terms): the curve has every column, null where absent."""

    def __init__(self, track: Optional[Tracker] = None) -> None:
        self.track = track
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        row = dict(outputs["row"])
        self.rows.append(row)
        if self.track is not None:
            self.track.log({f"refine/{k}": v for k, v in row.items() if v is not None})

    def curve(self, max_points: int = CURVE_POINTS) -> dict[str, list[Optional[float]]]:
        """Columns ``step, loss, <terms>, lr`` (and any other column of a row) at evenly spaced
        steps, first and last included."""
        if not self.rows:
            return {}
        keep = thin(len(self.rows), max_points)
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        return {key: [self.rows[i].get(key) for i in keep] for key in columns}


class RefineProgressBar(TQDMProgressBar):
    """One bar labelled ``refine`` with its step total, created once: Lightning's own would first
    draw a "Training: 0/?" bar and then, per epoch, an "Epoch 0" one (the stream has no epochs)."""

    @property
    def train_description(self) -> str:
        return "refine"

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        total = self.total_train_batches
        self.train_progress_bar.total = None if total in (None, float("inf")) else int(total)


def trainer_kwargs(device: torch.device, steps: int, progress: bool, manual: bool = False
                   ) -> dict[str, Any]:
    """CPU-friendly Trainer settings: a fixed number of steps, nothing written to disk, no
    validation, no inference_mode (pitfall 7), deterministic kernels, one device.

    ``manual``: a module with manual optimization and several optimizers, whose ``global_step``
    counts every optimizer's steps; the run is then bounded by batches (one epoch of ``steps``
    batches of the endless stream) instead of ``max_steps``."""
    devices: list[int] | int
    if device.type == "cuda":
        accelerator, devices = "cuda", [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        accelerator, devices = device.type, 1
    bound = (dict(max_steps=-1, max_epochs=1, limit_train_batches=int(steps)) if manual
             else dict(max_steps=int(steps), max_epochs=-1))
    return dict(accelerator=accelerator, devices=devices, **bound,
                logger=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                deterministic=True, inference_mode=False, enable_progress_bar=bool(progress),
                enable_model_summary=False, log_every_n_steps=1, precision="32-true")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up banners (GPU/TPU available, tips) and the num_workers hint, which does
    not apply to an in-memory stream, stay out of the run's log."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
             "lightning.fabric.utilities.seed")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isn't any `val_dataloader`.*")
            # the teacher and frozen BN layers are in eval mode on purpose
            warnings.filterwarnings("ignore", message=".*in eval mode at the start of training.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _restore(student: Optional[nn.Module], teacher: nn.Module, device: torch.device) -> Iterator[None]:
    """Put back what refinement changes around the models: modes, devices, grad flags, and the
    process-wide deterministic-algorithms switch that ``Trainer(deterministic=True)`` sets."""
    modes = (student.training if student is not None else False, teacher.training)
    grads = [p.requires_grad for p in teacher.parameters()]
    det = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        for p, flag in zip(teacher.parameters(), grads):
            p.requires_grad_(flag)
        if student is not None:
            student.train(modes[0]).to(device)  # Lightning's teardown moves the module to the CPU
        teacher.train(modes[1]).to(device)


@contextmanager
def training(student: Optional[nn.Module], teacher: nn.Module, ctx: StrategyContext, cfg: Optional[RefineConfig],
             seed_stream: str) -> Iterator[list[nn.Parameter]]:
    """The surroundings every refinement fit runs in (also the generator-only warm-up, with
    ``student=None``): no inference_mode (pitfall 7), modes/devices/grad flags restored, the
    caller's RNG untouched (the fit draws from the run's ``seed_stream``), learned activation
    ranges swapped in when ``cfg.act_ranges=learned`` (yields their parameters), Lightning quiet,
    the teacher frozen (no parameter gradient, eval mode)."""
    device = torch.device(ctx.device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(_restore(student, teacher, device))
        # Dropout (if any) draws from a stream of its own; the caller's RNG state is left as it was.
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        torch.manual_seed(stream_seed(ctx.seed, seed_stream))
        learned = student is not None and getattr(cfg, "act_ranges", "frozen") == "learned"
        ranges = stack.enter_context(learned_act_ranges(student)) if learned and student is not None else []
        stack.enter_context(_quiet_lightning())
        teacher.requires_grad_(False)
        yield [p for q in ranges for p in (q.lo, q.hi)]


def fit(module: StudentModule, data: DataLoader, ctx: StrategyContext, steps: int, recorder: CurveRecorder,
        manual: bool = False) -> None:
    """Train ``module`` for ``steps`` batches of ``data`` on Lightning (inside :func:`training`)."""
    try:
        module.train()
        bar = [RefineProgressBar(leave=True)] if ctx.progress else []
        trainer = L.Trainer(callbacks=[recorder, *bar],
                            **trainer_kwargs(torch.device(ctx.device), steps, ctx.progress, manual))
        trainer.fit(module, train_dataloaders=data)
    finally:
        module.remove_hooks()


def check_length(rows: list, steps: int, strategy: Strategy) -> None:
    if len(rows) != steps:
        raise RuntimeError(f"refine: the stream of strategy {getattr(strategy, 'name', strategy)!r} "
                           f"ended after {len(rows)} of {steps} steps")


def distill(student: nn.Module, teacher: nn.Module, strategy: Strategy, ctx: StrategyContext,
            calib: CalibrationSet, cfg: RefineConfig, steps: int, batch_size: int, track: Optional[Tracker] = None,
            terms: Optional[Sequence[tuple[str, float, LossTerm]]] = None) -> dict[str, Any]:
    """Train ``student`` in place for ``steps`` steps on ``strategy.batches(...)``; the record.
    ``terms``: the weighted loss terms (default: ``refine.losses``)."""
    terms = list(build_terms(cfg) if terms is None else terms)
    plan = RefinePlan(steps, batch_size, len(calib), student, teacher)
    for _, _, term in terms:
        term.setup(plan)
    start = time.perf_counter()
    recorder = CurveRecorder(track)
    with training(student, teacher, ctx, cfg, "refine/torch") as range_params:
        module = DistillModule(student, teacher, terms, cfg, steps, range_params)
        module.guard_factor = factors(getattr(ctx, "guard", None))[0]
        data = stream.loader(strategy, ctx, calib, batch_size, ctx.generator("refine/order"))
        fit(module, data, ctx, steps, recorder)
    seconds = time.perf_counter() - start
    rows = recorder.rows
    check_length(rows, steps, strategy)
    log.info("refine: %d steps x %d images in %.1f s, loss %.4f -> %.4f", steps, batch_size, seconds,
             rows[0]["loss"], rows[-1]["loss"])
    return refine_record(len(rows), batch_size, module.images_seen, round(seconds, 3), rows[0]["loss"],
                         rows[-1]["loss"], {name: weight for name, weight, _ in terms}, recorder.curve())
