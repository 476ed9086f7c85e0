"""FDDA: the real one-image-per-class set, the per-class centers in the deep layers, the C-BNS /
D-BNS generator terms (hand-made targets, noise variances, gradients), the quantized model trained
on real + synthetic batches, determinism and bad inputs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import run_twice
from test_generator import SMOKE, build_strategy, refine_w4a4, smoke_run, tiny_gen_ctx
from test_refine import _same, _state

from calibbench import strategies
from calibbench.bnstats import BNStatsRecorder, BNTargets, find_bn_layers
from calibbench.config import ConfigError
from calibbench.generative.fdda import CBNSTerm, DBNSTerm
from calibbench.generative.network import build_generator
from calibbench.generative.strategy import class_stats, deep_start
from calibbench.generative.terms import GenStepOutputs, build_gen_terms


def _fdda(compose, *overrides):
    return build_strategy(compose, "fdda", *overrides)


_tiny = tiny_gen_ctx


class _Cfg:
    def __init__(self, **kw):
        self.bns_moment, self.noise_param, self.fine_stats = "var", "variance", "image"
        self.v_mu, self.v_sigma = 0.5, 1.0
        self.__dict__.update(kw)


def _hand_state():
    """One deep layer (index 1 of 2), 2 channels, 3 classes; class 2 has no real image."""
    return {"seed": 0, "k": 1, "eps": [0.0],
            "center_mean": [torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])],
            "center_std": [torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 1.0]])],
            "has_center": torch.tensor([True, True, False])}


def _hand_out(mean, std, labels, step=7):
    shallow = (torch.zeros(len(labels), 2), torch.ones(len(labels), 2))
    return GenStepOutputs(torch.zeros(len(labels), 3, 2, 2), labels, torch.zeros(len(labels), 3), [],
                          BNTargets([], [], []), step, [shallow, (mean, std)], _hand_state())


# -- the terms: hand-made targets --------------------------------------------------------------------
def test_cbns_targets_are_each_class_center_by_hand():
    mean = torch.tensor([[2.0, 2.0], [3.0, 6.0], [9.0, 9.0]])
    std = torch.tensor([[1.0, 2.0], [2.0, 1.0], [5.0, 5.0]])
    out = _hand_out(mean, std, torch.tensor([0, 1, 2]))
    # sample 0 (class 0): mean diff (1, 0), var diff (0, 3); sample 1 (class 1): (0, 2), (0, 0);
    # sample 2 (class 2): no center -> left out. MSE over 2 samples x 2 channels.
    expected = (1 + 0 + 0 + 4) / 4 + (0 + 9 + 0 + 0) / 4
    assert float(CBNSTerm(_Cfg())(out)) == pytest.approx(expected)
    assert float(CBNSTerm(_Cfg(bns_moment="std"))(out)) == pytest.approx((1 + 4) / 4 + 1 / 4)
    # no sample of a class with a center: zero, still a tensor
    assert float(CBNSTerm(_Cfg())(_hand_out(mean[2:], std[2:], torch.tensor([2])))) == 0.0


def test_cbns_class_batch_pools_each_class_by_hand():
    mean = torch.tensor([[0.0, 2.0], [2.0, 2.0], [3.0, 4.0]])
    std = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    classes, cmean, cstd = class_stats(mean, std, labels)
    # class 0: means 0 and 2 -> 1, var = 1 + 1 (spread of the means) = 2; channel 2: 2, var 1
    assert classes.tolist() == [0, 1]
    assert torch.allclose(cmean, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.allclose(cstd.pow(2), torch.tensor([[2.0, 1.0], [4.0, 1.0]]))
    out = _hand_out(mean, std, labels)
    # class 0 vs center (1,2)/(1,1): mean 0, var diff (1, 0); class 1 equals its center exactly
    assert float(CBNSTerm(_Cfg(fine_stats="class_batch"))(out)) == pytest.approx(1 / 4)


@pytest.mark.parametrize("noise_param,var_mu,var_sigma", [("variance", 0.5, 1.0), ("std", 0.25, 1.0)])
def test_dbns_targets_are_the_centers_plus_noise_with_the_configured_variances(noise_param, var_mu, var_sigma):
    state, term = _hand_state(), DBNSTerm(_Cfg(noise_param=noise_param))
    c_mean, c_var = state["center_mean"][0], state["center_std"][0].pow(2)
    keys = torch.tensor([0, 1]).repeat(20000)
    t_mean, t_var = term.targets(c_mean, c_var, keys, 1, 3, state)
    for c in (0, 1):
        rows = keys == c
        assert torch.allclose(t_mean[rows].mean(0), c_mean[c], atol=0.03)
        assert torch.allclose(t_var[rows].mean(0), c_var[c], atol=0.04)
        assert torch.allclose(t_mean[rows].var(0), torch.full((2,), var_mu), rtol=0.05)
        assert torch.allclose(t_var[rows].var(0), torch.full((2,), var_sigma), rtol=0.05)
    # resampled per synthetic sample and per step, reproducible for a given step
    assert not torch.equal(t_mean[0], t_mean[2])
    again, _ = term.targets(c_mean, c_var, keys, 1, 3, state)
    other, _ = term.targets(c_mean, c_var, keys, 1, 4, state)
    assert torch.equal(again, t_mean) and not torch.equal(other, t_mean)


def test_dbns_without_noise_is_cbns():
    mean, std = torch.randn(4, 2), torch.rand(4, 2) + 0.5
    out = _hand_out(mean, std, torch.tensor([0, 1, 1, 0]))
    assert float(DBNSTerm(_Cfg(v_mu=0.0, v_sigma=0.0))(out)) == pytest.approx(float(CBNSTerm(_Cfg())(out)))
    assert float(DBNSTerm(_Cfg())(out)) != pytest.approx(float(CBNSTerm(_Cfg())(out)))


@pytest.mark.parametrize("name", ["cbns", "dbns"])
def test_each_fdda_term_reaches_the_generator_and_not_the_fp_model(compose, make_ctx, name):
    _, strategy = _fdda(compose, *[f"strategy.losses.{t}={float(t == name)}" for t in ("ce", "bns", "dbns", "cbns")])
    teacher, ctx = _tiny(make_ctx)
    teacher.requires_grad_(False)
    layers = find_bn_layers(teacher)
    state = strategy.setup_state(ctx, layers)
    (term_name, _, term), = build_gen_terms(strategy.cfg)
    assert term_name == name and term.per_image_stats
    gen = build_generator(10, 10, 8)
    with BNStatsRecorder(teacher, layers=layers, per_image=True, per_batch=True, correction=0) as rec:
        y = torch.arange(8) % 10
        images = gen(torch.randn(8, 100), y)
        out = GenStepOutputs(images, y, teacher(images), rec.batch_stats(), rec.targets(), 1,
                             rec.image_stats(), state)
    value = term(out)
    assert value.ndim == 0 and torch.isfinite(value) and float(value.detach()) > 0
    value.backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


# -- deep layers, centers, the real set ---------------------------------------------------------------
def test_deep_start_index():
    # K = ceil(L/2) - 2; the paper counts layers from 1, the code uses K as a 0-based index
    assert [deep_start(L, "one_based") for L in (21, 20, 19, 4, 2)] == [8, 7, 7, 0, 0]
    assert [deep_start(L, "zero_based") for L in (21, 20, 19)] == [9, 8, 8]


@pytest.mark.needs_shared
def test_deep_layers_on_resnet20(compose, resnet20, cifar):
    _, strategy = _fdda(compose)
    from calibbench.config import BudgetConfig
    from calibbench.strategies import StrategyContext

    layers = strategy.bn_layers(resnet20)
    assert len(layers) == 21  # stem + 9 units x 2 + 2 downsampling identity convs
    ctx = StrategyContext(resnet20, cifar, torch.device("cpu"), 0, 16,
                          BudgetConfig(name="t", pool_size=64, calib_batch_size=16), progress=False)
    state = strategy.setup_state(ctx, layers)
    assert state["k"] == 8 and len(state["center_mean"]) == 13  # l = 9..21 counted from 1
    assert state["deep_layers"][0] == "features.stage2.unit1.body.conv2.bn"
    assert state["deep_layers"][-1] == layers[-1][0]
    assert state["center_mean"][-1].shape == (10, 64) and bool(state["has_center"].all())


def test_one_real_image_per_class_with_dataset_labels(compose, make_ctx):
    _, strategy = _fdda(compose)
    teacher, ctx = _tiny(make_ctx)
    real = strategy.real_set(ctx)
    targets = ctx.data.targets("train")
    assert real["labels"].tolist() == list(range(10)) and real["missing"] == []
    assert [targets[i] for i in real["indices"]] == real["labels"].tolist()
    # the first image of each class in the run's seeded pool order
    order = ctx.pool_permutation().tolist()
    first = {}
    for i in order:
        first.setdefault(targets[i], i)
    assert real["indices"] == [first[c] for c in range(10)]
    assert torch.equal(real["images"][3], ctx.data.train[real["indices"][3]][0])
    other = strategies.build(strategy.cfg).real_set(make_ctx(teacher, ctx.data, seed=1))
    assert other["indices"] != real["indices"]  # seeded


def test_predicted_labels_are_the_fp_models_predictions(compose, make_ctx):
    _, strategy = _fdda(compose, "strategy.real_labels=predicted")
    teacher, ctx = _tiny(make_ctx)
    real = strategy.real_set(ctx)
    with torch.no_grad():
        pred = teacher(real["images"]).argmax(1)
    assert torch.equal(pred, real["labels"]) and len(set(real["labels"].tolist())) == len(real["labels"])
    assert sorted(real["missing"] + real["labels"].tolist()) == list(range(10))
    # a class the FP model never predicts has no center: its C-/D-BNS are left out
    state = strategy.setup_state(ctx, find_bn_layers(teacher))
    assert state["has_center"].tolist() == [c not in real["missing"] for c in range(10)]


# -- the strategy end to end ----------------------------------------------------------------------------
def test_fdda_smoke_step_trains_on_real_and_synthetic_and_leaves_the_fp_model_bit_identical(compose, make_ctx):
    cfg, strategy = _fdda(compose, "refine.lr=0.01")
    teacher, ctx = _tiny(make_ctx, warmup=2, steps=2)
    before = _state(teacher)
    calib = strategy.calibration_set(ctx)
    info = calib.info
    assert calib.images.shape == (16, 3, 8, 8) and not info["real_in_calibration_set"]
    assert info["real_labels"] == list(range(10)) and info["real_per_class_counts"] == [1] * 10
    assert info["warmup_steps"] == 2 and info["images_generated"] == 2 * 8 + 16
    assert set(info["warmup_curve"]) >= {"generator/ce", "generator/bns", "generator/dbns", "generator/cbns"}
    assert info["generator_terms"] == {"ce": 0.5, "bns": 0.2, "dbns": 0.9, "cbns": 0.05}
    assert cfg.refine.name == "fdda" and dict(cfg.refine.losses) == {"ce": 1.0, "kd": 20.0}
    rec = refine_w4a4(teacher, strategy, ctx, calib, cfg, before)
    assert _same(before, _state(teacher)) and not teacher.training
    # every step: 8 synthetic + min(8, 10 real) real images
    assert rec["steps"] == 2 and rec["images_seen"] == 2 * (8 + 8) and rec["warmup_steps"] == 2
    assert {"loss", "kd", "ce", "generator/dbns", "generator/cbns"} <= set(rec["curve"])
    assert all(math.isfinite(v) for v in rec["curve"]["generator/dbns"])


@pytest.mark.needs_shared
def test_same_seed_same_run(compose, tmp_path):
    a, b = run_twice(compose, tmp_path, *SMOKE, "strategy=fdda")
    for key in ("warmup_curve", "real_indices"):
        assert a["calibration"]["info"][key] == b["calibration"]["info"][key]
    assert a["refine"]["name"] == "fdda" and a["refine"]["steps"] == 3


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["refine=none"], "strategy=fdda with refine=none: the generator and the quantized model are trained together"),
    (["strategy.real_labels=oracle"], "unknown strategy fdda real_labels 'oracle'"),
    (["strategy.k_indexing=two"], "unknown strategy fdda k_indexing 'two'"),
    (["strategy.v_mu=-1"], "strategy.v_mu=-1.0 must be >= 0"),
    (["strategy.losses.dbns=-1"], "strategy.losses.dbns=-1.0 is negative"),
])
def test_bad_fdda_config_is_one_clear_error(compose, overrides, message):
    cfg, strategy = _fdda(compose, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        strategy.check_run(cfg)


# -- the CLI ----------------------------------------------------------------------------------------------
@pytest.mark.needs_shared
def test_fdda_end_to_end(compose, tmp_path):
    record = smoke_run(compose, tmp_path, "strategy=fdda", "budget.eval_limit=100")
    assert record["status"] == "ok" and record["refine"]["name"] == "fdda"
    info = record["calibration"]["info"]
    assert record["calibration"]["strategy"] == "fdda" and len(info["real_indices"]) == 10
    assert {"generator/dbns", "generator/cbns", "kd", "ce"} <= set(record["refine"]["curve"])
    assert record["refine"]["images_seen"] == 3 * (16 + 10)  # synthetic + real in every step
