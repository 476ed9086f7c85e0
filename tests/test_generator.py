"""Generator-based DFQ core: the conditional generator, its loss terms, the alternating
generator / quantized-model training (refine=gdfq on Lightning), the gdfq strategy, records,
determinism and every bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import run_twice, tiny_datamodule
from test_refine import TinyNet, _qweights, _same, _state
from torch import nn

from calibbench import quant, refine, strategies
from calibbench.bnstats import BNStatsRecorder, find_bn_layers
from calibbench.config import ConfigError
from calibbench.generative.network import ConditionalBatchNorm2d, Generator, build_generator
from calibbench.generative.terms import GenBNSTerm, GenStepOutputs, build_gen_terms
from calibbench.pipeline import run
from calibbench.refine.losses import KDTerm

SMOKE = ("budget=smoke", "num_samples=16")



def build_strategy(compose, name, *overrides):
    """(config, strategy) of a generator strategy at budget=smoke (shared by the fdda/clusterq tests)."""
    cfg = compose(*SMOKE, f"strategy={name}", *overrides)
    return cfg, strategies.build(cfg.strategy)


def _gdfq(compose, *overrides):
    return build_strategy(compose, "gdfq", *overrides)


def tiny_gen_ctx(make_ctx, warmup=1, steps=2, batch=8, n_train=64):
    """A TinyNet teacher and a context over tiny 8-px data with generator-sized budgets."""
    teacher = TinyNet().eval()
    data = tiny_datamodule(n_train=n_train, n_val=32, size=8)
    ctx = make_ctx(teacher, data, num_samples=16, refine_steps=steps, gen_warmup_steps=warmup,
                   gen_batch_size=batch)
    return teacher, ctx


_tiny = tiny_gen_ctx


def refine_w4a4(teacher, strategy, ctx, calib, cfg, teacher_before) -> dict:
    """Calibrate a W4A4 student on the set, refine it with ``cfg.refine``; assert its quantized
    weights changed and the teacher is bit-identical to ``teacher_before``; the refine record."""
    student = quant.quantize(teacher, cfg.quant, 4, 4)
    quant.calibrate(student, calib.images.split(8), "cpu")
    w_before = _qweights(student)
    rec = refine.run(student, teacher, strategy, ctx, calib, cfg.refine)
    assert any(not torch.equal(a, b) for a, b in zip(w_before, _qweights(student)))
    assert _same(teacher_before, _state(teacher))
    return rec


# -- the generator -------------------------------------------------------------------------------
@pytest.mark.parametrize("size,variant,n", [(32, "cifar", 4), (224, "imagenet", 2)])
def test_generator_shape_and_normalized_output(size, variant, n):
    torch.manual_seed(0)
    gen = build_generator(10, 10, size)
    assert gen.variant == variant and gen.latent_dim == 100
    assert any(isinstance(m, ConditionalBatchNorm2d) for m in gen.modules()) == (variant == "imagenet")
    x = gen(torch.randn(n, 100), torch.arange(n))
    assert x.shape == (n, 3, size, size) and torch.isfinite(x).all()
    # final BN(affine=False) in training mode: every channel standardized over the batch
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2)


def test_generator_num_classes_must_match_the_model():
    with pytest.raises(ConfigError, match=r"generator has num_classes=5 but the model predicts 10"):
        build_generator(5, 10, 32, strategy="gdfq")
    with pytest.raises(ConfigError, match="multiple of 16"):
        Generator(10, 72, variant="imagenet")


@pytest.mark.parametrize("name", ["ce", "bns"])
def test_each_generator_term_reaches_the_generator_and_not_the_fp_model(compose, name):
    _, strategy = _gdfq(compose, *[f"strategy.losses.{t}={float(t == name)}" for t in ("ce", "bns")])
    teacher = TinyNet().eval().requires_grad_(False)
    gen = build_generator(10, 10, 8)
    (term_name, _, term), = build_gen_terms(strategy.cfg)
    assert term_name == name
    layers = find_bn_layers(teacher)
    with BNStatsRecorder(teacher, layers=layers, per_image=False, per_batch=True, correction=0) as rec:
        y = torch.arange(8) % 10
        images = gen(torch.randn(8, 100), y)
        out = GenStepOutputs(images, y, teacher(images), rec.batch_stats(), rec.targets(), 1)
    value = term(out)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_bns_term_is_mean_and_variance_mse_averaged_over_layers():
    targets_mean = [torch.tensor([0.0, 1.0]), torch.tensor([2.0])]
    targets_std = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    from calibbench.bnstats import BNTargets

    batch = [(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])), (torch.tensor([2.0]), torch.tensor([3.0]))]
    out = GenStepOutputs(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2), batch,
                         BNTargets(["a", "b"], targets_mean, targets_std), 1)
    cfg = type("C", (), {"bns_moment": "var"})()
    # layer a: mean MSE (1 + 0)/2 = 0.5, var MSE ((4-1)^2 + 0)/2 = 4.5; layer b: 0
    assert float(GenBNSTerm(cfg)(out)) == pytest.approx((0.5 + 4.5) / 2)
    cfg.bns_moment = "std"
    assert float(GenBNSTerm(cfg)(out)) == pytest.approx((0.5 + 0.5) / 2)


# -- the strategy and the alternating stage ----------------------------------------------------------
def test_gdfq_smoke_step_trains_the_quantized_model_and_leaves_the_fp_model_bit_identical(compose, make_ctx):
    cfg, strategy = _gdfq(compose, "refine.lr=0.05")
    teacher, ctx = _tiny(make_ctx, warmup=2, steps=2)
    before = _state(teacher)
    calib = strategy.calibration_set(ctx)
    assert calib.images.shape == (16, 3, 8, 8)
    assert torch.equal(torch.bincount(calib.labels), torch.full((10,), 1) + (torch.arange(10) < 6))
    info = calib.info
    assert info["warmup_steps"] == 2 and info["images_generated"] == 2 * 8 + 16
    assert sum(info["per_class_counts"]) == info["images_generated"]
    assert set(info["warmup_curve"]) == {"step", "generator/ce", "generator/bns", "generator/loss", "generator/lr"}
    assert "generator" in calib.state and calib.state["optimizer"]["state"]  # Adam moments after warm-up
    # spy on the refinement's generator optimizer: the generator it trains and the Adam moments
    seen: list[tuple[dict, torch.optim.Optimizer]] = []
    build = strategy.optimizer

    def spy(generator):  # noqa: ANN001, ANN202
        opt = build(generator)
        seen.append(({k: v.detach().clone() for k, v in generator.state_dict().items()}, opt))
        return opt

    strategy.optimizer = spy
    rec = refine_w4a4(teacher, strategy, ctx, calib, cfg, before)
    assert _same(before, _state(teacher)) and not teacher.training
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored
    assert rec["steps"] == 2 and rec["images_seen"] == 16 and rec["warmup_steps"] == 2
    assert rec["curve"]["step"] == [3, 4] and math.isfinite(rec["loss_last"])
    assert {"loss", "kd", "ce", "lr", "generator/ce", "generator/bns", "generator/loss"} <= set(rec["curve"])
    assert rec["images_generated_total"] == info["images_generated"] + 16 == sum(rec["per_class_counts"])
    # the generator kept training: its refinement starts from the warmed-up weights and Adam
    # moments (2 warm-up + 2 refinement steps), not from scratch
    (weights, opt), = seen
    warmed = calib.state["generator"]
    assert weights.keys() == warmed.keys()
    assert all(torch.equal(weights[k], v) for k, v in warmed.items())
    # ...and the warm-up really moved the generator, so a re-initialised generator (same seeded
    # init stream) could not pass the equality above: its weights and images differ
    fresh = strategy.build_generator(ctx)
    moved = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and not torch.equal(v, warmed[k])]
    assert sum(fresh.state_dict()[k].numel() for k in moved) > 0.9 * sum(
        v.numel() for v in warmed.values() if v.is_floating_point())
    z, y = torch.randn(4, fresh.latent_dim, generator=torch.Generator().manual_seed(5)), torch.arange(4)
    continued = strategy.build_generator(ctx)
    continued.load_state_dict(weights)
    with torch.no_grad():
        assert not torch.allclose(continued.eval()(z, y), fresh.eval()(z, y))
    assert {int(st["step"]) for st in opt.state.values()} == {4}
    assert rec["curve"]["generator/lr"] == [1e-3, 1e-3]


def test_strategy_hooks_real_batches_and_state(compose, make_ctx):
    """A subclass adds a real batch to every quantized-model step and counts its steps in state."""
    cfg, _ = _gdfq(compose)
    teacher, ctx = _tiny(make_ctx, warmup=1, steps=2)
    seen = []

    class WithReal(type(strategies.build(cfg.strategy))):
        def setup_state(self, ctx, layers):  # noqa: ANN001, ANN201
            return {"updates": torch.zeros(())}

        def update_state(self, state, out, step):  # noqa: ANN001, ANN201
            assert not torch.is_grad_enabled()
            state["updates"] += 1
            seen.append(step)

        def real_batch(self, ctx, batch_size, generator):  # noqa: ANN001, ANN201
            return torch.randn(3, 3, 8, 8, generator=generator), torch.arange(3)

    strategy = WithReal(cfg.strategy)
    calib = strategy.calibration_set(ctx)
    assert float(calib.state["strategy"]["updates"]) == 1
    student = quant.quantize(teacher, cfg.quant, 4, 4)
    quant.calibrate(student, calib.images.split(8), "cpu")
    rec = refine.run(student, teacher, strategy, ctx, calib, cfg.refine)
    assert seen == [1, 2, 3] and rec["images_seen"] == 2 * (8 + 3)


@pytest.mark.needs_shared
def test_same_seed_same_curve_and_accuracy(compose, tmp_path):
    a, b = run_twice(compose, tmp_path, *SMOKE, "strategy=gdfq")
    assert a["calibration"]["info"]["warmup_curve"] == b["calibration"]["info"]["warmup_curve"]
    assert a["refine"]["name"] == "gdfq" and a["refine"]["steps"] == 3 and a["refine"]["warmup_steps"] == 2


# -- bad input -------------------------------------------------------------------------------------
def test_refine_none_with_gdfq_says_why(compose):
    cfg, strategy = _gdfq(compose, "refine=none")
    with pytest.raises(ConfigError, match=r"strategy=gdfq with refine=none: the generator and the "
                                          r"quantized model are trained together inside the refinement"):
        strategy.check_run(cfg)
    cfg, strategy = _gdfq(compose, "refine=kd")
    strategy.check_run(cfg)  # a fixed synthetic set distilled with kd is fine


@pytest.mark.parametrize("overrides,message", [
    (["strategy=random", "refine=gdfq"], "refine=gdfq trains a generator together with the quantized model"),
    (["strategy=gdfq", "+strategy.losses.nope=1"], "unknown strategy gdfq generator loss term 'nope'"),
    (["strategy=gdfq", "strategy.losses.ce=-1"], "strategy.losses.ce=-1.0 is negative"),
    (["strategy=gdfq", "strategy.labels=sorted"], "unknown strategy gdfq labels 'sorted'"),
])
def test_bad_generator_config_is_one_clear_error(compose, overrides, message):
    from calibbench.preflight import preflight

    cfg = compose(*SMOKE, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        preflight(cfg)


@pytest.mark.parametrize("name", ["gdfq", "fdda", "clusterq"])
def test_model_without_batchnorm_names_the_strategy(compose, make_ctx, name):
    _, strategy = build_strategy(compose, name)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    ctx = make_ctx(model.eval(), tiny_datamodule(size=8), gen_warmup_steps=1, gen_batch_size=8)
    with pytest.raises(ConfigError, match=rf"strategy {name} needs a model with BatchNorm layers"):
        strategy.calibration_set(ctx)


def test_generator_num_classes_mismatch_with_the_model(compose, make_ctx):
    _, strategy = _gdfq(compose, "strategy.num_classes=100")
    teacher, ctx = _tiny(make_ctx)
    with pytest.raises(ConfigError,
                       match=r"strategy gdfq: the generator has num_classes=100 but the model predicts 10"):
        strategy.calibration_set(ctx)


def test_nan_in_the_quantized_model_names_player_step_and_term(compose, make_ctx, monkeypatch):
    cfg, strategy = _gdfq(compose)
    teacher, ctx = _tiny(make_ctx, warmup=1, steps=3)
    calib = strategy.calibration_set(ctx)
    student = quant.quantize(teacher, cfg.quant, 4, 4)
    quant.calibrate(student, calib.images.split(8), "cpu")
    real = KDTerm.__call__
    calls = []

    def poisoned(self, out):  # noqa: ANN001, ANN202
        calls.append(1)
        return real(self, out) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(KDTerm, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match=r"quantized model loss term\(s\) 'kd' = nan at step 3 of 4"):
        refine.run(student, teacher, strategy, ctx, calib, cfg.refine)


@pytest.mark.needs_shared
def test_nan_in_the_generator_fails_the_run_naming_player_step_and_term(compose, tmp_path, monkeypatch):
    real = GenBNSTerm.__call__

    def poisoned(self, out):  # noqa: ANN001, ANN202
        value = real(self, out)
        return value * float("nan") if out.step == 4 else value

    monkeypatch.setattr(GenBNSTerm, "__call__", poisoned)
    cfg = compose(*SMOKE, "strategy=gdfq", f"paths.output_dir={tmp_path / 'out'}")
    with pytest.raises(FloatingPointError, match=r"generator loss term\(s\) 'bns' = nan at step 4 of 5"):
        run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "generator" in record["error"] and "'bns'" in record["error"]


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.mark.needs_shared
def smoke_run(compose, tmp_path, *overrides: str) -> dict:  # noqa: ANN001
    """One run at budget=smoke, in-process (compose + pipeline.run, what the CLI calls; the CLI's
    own wrapping is tested in test_cli.py)."""
    cfg = compose(*SMOKE, *overrides, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    return run(cfg, tmp_path / "run")


def test_gdfq_end_to_end_and_refine_none_error(compose, tmp_path):
    record = smoke_run(compose, tmp_path, "strategy=gdfq", "budget.eval_limit=100")
    assert record["status"] == "ok" and record["refine"]["name"] == "gdfq"
    assert record["calibration"]["strategy"] == "gdfq" and record["calibration"]["synthetic"]
    assert "generator/bns" in record["refine"]["curve"] and record["timings"]["refine"] > 0
    with pytest.raises(ConfigError, match="trained together inside the refinement stage"):
        smoke_run(compose, tmp_path / "bad", "strategy=gdfq", "refine=none")
