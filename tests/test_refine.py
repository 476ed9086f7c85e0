"""Refinement (refine=kd on Lightning): loss terms and their gradients, what trains and what stays
frozen (teacher, BN running stats, activation ranges), the replayed stream, the inference-mode
trap, records and determinism through the pipeline, every strategy, and every bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import run_twice, tiny_datamodule
from torch import nn

from calibbench import quant, refine, strategies
from calibbench.config import ConfigError, QuantConfig, RefineConfig, validate
from calibbench.pipeline import run, run_key
from calibbench.quant.learned import LearnedRangeQuantizer
from calibbench.refine.distill import CurveRecorder, DistillModule, trainer_kwargs
from calibbench.refine.losses import build_terms
from calibbench.strategies.base import CalibrationSet, Strategy

SMOKE = ("budget=smoke", "num_samples=16")
FEATURE = "body.5"  # TinyNet's second ReLU (a QuantAct in the student), after both convs



class TinyNet(nn.Module):
    """conv-BN-ReLU ×2, pooled, linear: BN running stats that are not the defaults."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)
        for m in self.body:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(8, generator=g))
                m.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class ReplayOnly(Strategy):
    """A strategy whose calibration set must never be recomputed by the refinement stage."""

    name = "replay_only"

    def calibration_set(self, ctx):  # noqa: ANN001, ANN201
        raise AssertionError("refinement recomputed the calibration set")


def _setup(seed: int = 0, bits: int = 4, **refine_cfg):
    """(student, teacher, calib, ctx-maker args) on tiny data: calibrated W/A ``bits``."""
    torch.manual_seed(seed)
    teacher = TinyNet().eval()
    data = tiny_datamodule(n_train=64, n_val=32, size=8)
    images = torch.stack([data.train[i][0] for i in range(32)])
    labels = torch.tensor([data.train[i][1] for i in range(32)])
    calib = CalibrationSet(images, labels)
    student = quant.quantize(teacher, QuantConfig(name="dfq_legacy"), bits, bits)
    quant.calibrate(student, calib.images.split(16), "cpu")
    cfg = RefineConfig(name="kd", **refine_cfg)
    return student, teacher, calib, data, cfg


def _refine(student, teacher, calib, data, cfg, make_ctx, steps=2, batch_size=8, strategy=None):
    ctx = make_ctx(teacher, data, num_samples=len(calib), refine_steps=steps, refine_batch_size=batch_size)
    return refine.run(student, teacher, strategy or ReplayOnly(None), ctx, calib, cfg)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _qweights(model: nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m.quantized_weight().detach().clone() for m in model.modules()
                if isinstance(m, (quant.QuantConv2d, quant.QuantLinear))]


# -- loss terms --------------------------------------------------------------------------------
@pytest.mark.parametrize("losses,extra", [
    ({"kd": 1.0}, {"temperature": 4.0}),
    ({"ce": 1.0}, {}),
    ({"ce": 1.0}, {"ce_labels": "teacher"}),
    ({"feature": 1.0}, {"feature_modules": [FEATURE]}),
])
def test_each_term_reaches_the_student_weights_and_not_the_teacher(losses, extra):
    student, teacher, calib, _, cfg = _setup(losses=losses, **extra)
    teacher.requires_grad_(False)
    module = DistillModule(student, teacher, build_terms(cfg), cfg, 1).train()
    values = module.compute(calib.images[:8], calib.labels[:8])
    assert list(values) == list(losses) and all(torch.isfinite(v) for v in values.values())
    sum(values.values()).backward()
    module.remove_hooks()
    grads = [m.weight.grad for m in student.modules() if isinstance(m, (quant.QuantConv2d, quant.QuantLinear))]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads[:-1])
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_is_zero_for_identical_logits_and_scaled_by_t_squared():
    from calibbench.refine.losses import kd_loss

    s, t = torch.randn(4, 10), torch.randn(4, 10)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1),
                                     reduction="batchmean") * 4
    assert float(kd_loss(s, t, 2.0)) == pytest.approx(float(ref), rel=1e-5)


# -- what trains and what does not -----------------------------------------------------------------
def test_one_step_changes_quantized_weights_and_leaves_teacher_bit_identical(make_ctx):
    student, teacher, calib, data, cfg = _setup(lr=0.05)
    teacher_before, w_before = _state(teacher), _qweights(student)
    act_before = [q.scale.clone() for _, kind, q in quant.quantizers(student) if kind != "weight"]
    flags = [p.requires_grad for p in teacher.parameters()]
    rec = _refine(student, teacher, calib, data, cfg, make_ctx, steps=1)
    assert rec["steps"] == 1 and rec["images_seen"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(w_before, _qweights(student)))
    assert _same(teacher_before, _state(teacher))
    assert [p.requires_grad for p in teacher.parameters()] == flags and not teacher.training
    assert not student.training  # back in the mode it came in
    act_after = [q.scale for _, kind, q in quant.quantizers(student) if kind != "weight"]
    assert all(torch.equal(a, b) for a, b in zip(act_before, act_after))  # act_ranges=frozen


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_bn_mode(make_ctx, mode):
    student, teacher, calib, data, cfg = _setup(bn=mode, lr=0.05)
    bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bns]
    _refine(student, teacher, calib, data, cfg, make_ctx, steps=2)
    after = [(b.running_mean, b.running_var, int(b.num_batches_tracked)) for b in bns]
    unchanged = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                    for a, b in zip(before, after))
    assert unchanged == (mode == "frozen")


def test_learned_activation_ranges_move_and_are_written_back(make_ctx):
    student, teacher, calib, data, cfg = _setup(act_ranges="learned", lr=0.5, optimizer="adam")
    acts = [q for _, kind, q in quant.quantizers(student) if kind != "weight"]
    before = [q.range() for q in acts]
    _refine(student, teacher, calib, data, cfg, make_ctx, steps=3)
    assert acts == [q for _, kind, q in quant.quantizers(student) if kind != "weight"]  # originals back
    assert not any(isinstance(m, LearnedRangeQuantizer) for m in student.modules())
    assert any(not torch.equal(b[1], q.range()[1]) for b, q in zip(before, acts))
    assert all(q.active and q._fast is not None for q in acts)  # the frozen fast path again
    with torch.inference_mode():
        assert torch.isfinite(student(calib.images[:4])).all()


def test_learned_range_matches_the_frozen_grid_before_training():
    q = quant.UniformQuantizer(4, include_zero=True)
    q.set_range(torch.tensor(0.0), torch.tensor(3.0))
    learned = LearnedRangeQuantizer(q)
    x = torch.linspace(-1, 4, 101, requires_grad=True)
    y = learned(x)
    assert torch.allclose(y, q.fake_quantize(x.detach()), atol=1e-6)
    y.sum().backward()
    assert learned.hi.grad is not None and learned.hi.grad != 0


# -- the stream ------------------------------------------------------------------------------------
def test_default_stream_replays_the_set_shuffled_in_full_batches(make_ctx):
    _, teacher, calib, data, _ = _setup()
    ctx = make_ctx(teacher, data, num_samples=len(calib))
    strategy = ReplayOnly(None)
    stream = strategy.batches(ctx, calib, 12, ctx.generator("refine/order"))
    batches = [next(stream) for _ in range(8)]  # 96 images = 3 passes over 32
    assert all(x.shape[0] == 12 for x, _ in batches)
    seen = torch.cat([x for x, _ in batches]).flatten(1)
    index = {tuple(row.tolist()): i for i, row in enumerate(calib.images.flatten(1))}
    order = [index[tuple(row.tolist())] for row in seen]
    assert sorted(order) == sorted(list(range(32)) * 3)  # every image equally often
    assert order[:32] != list(range(32)) and order[:32] != order[32:64]  # shuffled, reshuffled
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, calib.labels[torch.tensor(order)])
    again = strategy.batches(ctx, calib, 12, ctx.generator("refine/order"))
    assert torch.equal(next(again)[0], batches[0][0])  # seeded


def test_curve_is_thinned_to_200_points_with_first_and_last():
    rec = CurveRecorder()
    rec.rows = [{"step": i + 1, "loss": float(i), "kd": float(i), "lr": 0.1} for i in range(1000)]
    curve = rec.curve()
    assert set(curve) == {"step", "loss", "kd", "lr"} and len(curve["step"]) == 200
    assert curve["step"][0] == 1 and curve["step"][-1] == 1000
    rec.rows = rec.rows[:3]
    assert rec.curve()["step"] == [1, 2, 3]


# -- the Lightning inference-mode trap ---------------------------------------------------------------
def test_inference_mode_never_reaches_quantizer_state(make_ctx):
    """Lightning evaluates under inference_mode by default; calibration or refinement state made
    there cannot be saved for backward later. Calibrate and refine while an outer inference_mode
    is active: refinement still trains, no buffer or parameter becomes an inference tensor, and
    a second refinement (backward through the same quantizers) works."""
    assert trainer_kwargs(torch.device("cpu"), 3, False)["inference_mode"] is False
    student, teacher, calib, data, cfg = _setup(lr=0.05)
    with torch.inference_mode():
        quant.calibrate(student, calib.images.split(16), "cpu")
        student(calib.images[:4])  # fills the eval-mode weight cache under inference_mode
        rec = _refine(student, teacher, calib, data, cfg, make_ctx, steps=2)
    assert rec["steps"] == 2 and math.isfinite(rec["loss_last"])
    tensors = list(student.parameters()) + list(student.buffers())
    assert not any(t.is_inference() for t in tensors)
    assert _refine(student, teacher, calib, data, cfg, make_ctx, steps=1)["steps"] == 1


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["refine=kd", "refine.name=distil"], "unknown refine 'distil'; valid choices: "),
    (["refine=kd", "budget.refine_steps=-1"], "budget.refine_steps=-1 is out of range"),
    (["refine=kd", "refine.losses.kd=-0.5"], "refine.losses.kd=-0.5 is negative"),
    (["refine=kd", "refine.temperature=0"], "refine.temperature=0.0 must be > 0"),
    (["refine=kd", "+refine.losses.mse=1"], "unknown refine loss term 'mse'; valid choices: ce, feature, kd"),
    (["refine=kd", "refine.losses.kd=0"], "no loss term with a positive weight"),
    (["refine=kd", "+refine.losses.feature=1"], "needs refine.feature_modules"),
    (["refine=kd", "+refine.losses.feature=1", "refine.feature_modules=[features.nope]"],
     "refine.feature_modules: ['features.nope'] not in model"),
    (["refine=kd", "refine.optimizer=lbfgs"], "unknown refine.optimizer 'lbfgs'; valid choices: sgd, adam"),
    (["refine=kd", "refine.bn=update"], "unknown refine.bn 'update'"),
    (["refine=kd", "refine.act_ranges=lsq"], "unknown refine.act_ranges 'lsq'"),
    (["refine=kd", "refine.ce_labels=pseudo"], "unknown refine.ce_labels 'pseudo'"),
])
def test_bad_refine_config_is_one_clear_error(compose, overrides, message):
    cfg = compose(*SMOKE, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)
        refine.validate(cfg)


def test_bad_refine_config_fails_the_run_before_any_work(compose, tmp_path):
    cfg = compose(*SMOKE, "refine=kd", "+refine.losses.feature=1", "refine.feature_modules=[nope]",
                  f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match="not in model"):
        run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "nope" in record["error"]
    assert "model" not in record["timings"]  # nothing was built


def test_feature_modules_that_exist_pass(compose):
    cfg = compose(*SMOKE, "refine=kd", "+refine.losses.feature=1",
                  "refine.feature_modules=[features.stage1.unit1,features.stage3]")
    refine.validate(cfg)


# -- through the pipeline ----------------------------------------------------------------------------
@pytest.mark.needs_shared
def test_same_seed_same_curve_and_accuracy_and_the_record(compose, tmp_path):
    a, _ = run_twice(compose, tmp_path, *SMOKE, "refine=kd")
    rec = json.loads((tmp_path / "a" / "result.json").read_text())["refine"]
    assert rec["name"] == "kd" and rec["steps"] == 3 and rec["images_seen"] == 3 * 16
    assert rec["seconds"] > 0 and rec["loss_first"] == rec["curve"]["loss"][0]
    assert rec["loss_last"] == rec["curve"]["loss"][-1] and set(rec["curve"]) == {"step", "loss", "kd", "lr"}
    assert rec["curve"]["lr"][0] == pytest.approx(1e-4) and rec["curve"]["lr"][-1] < 1e-4  # cosine
    assert a["images_seen"] == a["calibration"]["images_seen"] + 48
    assert run_key(compose(*SMOKE, "refine=kd")) != run_key(compose(*SMOKE, "refine=kd", "refine.lr=0.01"))


@pytest.mark.needs_shared
def test_nan_loss_stops_the_run_naming_step_and_term(compose, tmp_path, monkeypatch):
    from calibbench.strategies.random import RandomSelection

    def poisoned(self, ctx, calib, batch_size, generator):  # noqa: ANN001, ANN202
        stream = calib.replay(batch_size, generator)
        yield next(stream)
        x, y = next(stream)
        yield torch.full_like(x, float("nan")), y

    monkeypatch.setattr(RandomSelection, "batches", poisoned)
    cfg = compose(*SMOKE, "refine=kd", f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(FloatingPointError, match=r"'kd' = nan at step 2 of 3"):
        run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "step 2" in record["error"] and "'kd'" in record["error"]


@pytest.mark.parametrize("name", strategies.available())
def test_refine_composes_with_every_strategy(compose, make_ctx, name):
    """Each registered strategy's smoke config, on tiny data and TinyNet: calibration set →
    quantize → calibrate → refine=kd through the strategy's own stream."""
    cfg = compose(*SMOKE, f"strategy={name}", "refine=kd")
    tame = {"lr": "strategy.lr=0.05", "margin_samples": "strategy.margin_samples=8"}  # synthesis on TinyNet
    extra = [override for key, override in tame.items() if key in cfg.strategy]
    if extra:
        cfg = compose(*SMOKE, f"strategy={name}", "refine=kd", *extra)
    teacher = TinyNet().eval()
    data = tiny_datamodule(n_train=64, n_val=32, size=8)
    ctx = make_ctx(teacher, data, num_samples=16, refine_steps=2, refine_batch_size=8)
    strategy = strategies.build(cfg.strategy)
    calib = strategy.calibration_set(ctx)
    student = quant.quantize(teacher, cfg.quant, 4, 4)
    quant.calibrate(student, calib.images.split(8), "cpu")
    before = _state(teacher)
    rec = refine.run(student, teacher, strategy, ctx, calib, cfg.refine)
    assert rec["steps"] == 2 and rec["images_seen"] == 16 and math.isfinite(rec["loss_last"])
    assert _same(before, _state(teacher))


def test_kd_reduction_mean_is_gdfqs_elementwise_kl(compose):
    """refine.kd_reduction=mean is nn.KLDivLoss()'s element-wise mean: batchmean / classes; GDFQ's
    refiner defaults to it, ClusterQ's (and kd) to batchmean, as their public code."""
    from calibbench.refine.losses import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    ref = torch.nn.KLDivLoss()(torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1)) * 16
    assert float(kd_loss(s, t, 4.0, "mean")) == pytest.approx(float(ref), rel=1e-5)
    assert float(kd_loss(s, t, 4.0, "batchmean")) == pytest.approx(10 * float(ref), rel=1e-5)
    assert compose("refine=gdfq").refine.kd_reduction == "mean"
    assert compose("refine=clusterq").refine.kd_reduction == "batchmean"
    assert compose("refine=kd").refine.kd_reduction == "batchmean"
