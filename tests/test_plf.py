"""PLF (pseudo-label filtering): the reliability split and labels on hand-made logits, the
threshold schedule, the loss terms' gradients, the ablation switches, the synthesis objective,
family defaults, the cache key, determinism through the pipeline, and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_twice
from torch import nn

from calibbench import quant, refine, strategies
from calibbench.config import ConfigError, QuantConfig, validate
from calibbench.pipeline import calibration_budget
from calibbench.refine.losses import RefinePlan, StepOutputs
from calibbench.refine.plf import (
    FeatureMSE,
    HighReliableCE,
    LowReliableCE,
    ReliabilitySchedule,
    auxiliary_labels,
    channel_attention,
    high_reliable,
    major_labels,
    plf_weights,
    self_entropy,
    stage_modules,
    threshold,
    unit_modules,
)

SMOKE = ("strategy=plf", "budget=smoke", "budget.plf_samples=16", "budget.plf_iterations=2")


def _probs(logits):
    return F.softmax(torch.tensor(logits, dtype=torch.float32), dim=1)


# -- eq. 3-10 on hand-made logits ----------------------------------------------------------------
def test_confident_sample_is_high_reliable_with_its_argmax():
    probs = _probs([[0.0, 12.0, 0.0, 0.0]])
    ent = self_entropy(probs)
    assert 0.0 <= float(ent) < 0.01
    assert bool(high_reliable(ent, 0.2)[0])
    assert int(major_labels(probs)[0]) == 1


def test_two_way_tie_is_low_reliable_with_half_weights():
    # Two classes share nearly all the mass: entropy log 2 / log 4 = 0.5 > T_l, and the
    # renormalized weights of the two labels are 0.5 / 0.5 (eq. 10).
    probs = _probs([[10.0, 10.0, -10.0, -10.0]])
    ent = self_entropy(probs)
    assert float(ent) == pytest.approx(0.5, abs=1e-3)
    assert not bool(high_reliable(ent, 0.2)[0])
    primary, secondary, lam_p, lam_s = auxiliary_labels(probs)
    assert {int(primary), int(secondary)} == {0, 1}
    assert float(lam_p) == pytest.approx(0.5, abs=1e-6) and float(lam_s) == pytest.approx(0.5, abs=1e-6)
    assert float(lam_p + lam_s) == pytest.approx(1.0)


def test_uniform_prediction_has_entropy_one_and_weights_renormalize():
    assert float(self_entropy(torch.full((1, 10), 0.1))) == pytest.approx(1.0, abs=1e-6)
    probs = torch.tensor([[0.6, 0.2, 0.1, 0.1]])
    p, s, lam_p, lam_s = auxiliary_labels(probs)
    assert (int(p), int(s)) == (0, 1)
    assert float(lam_p) == pytest.approx(0.75) and float(lam_s) == pytest.approx(0.25)


def test_threshold_schedule_first_middle_last_epoch():
    # eq. 5: T_u at the first epoch, halfway at the middle one, T_l at the last.
    assert threshold(0, 5, 0.2, 0.5) == pytest.approx(0.5)
    assert threshold(2, 5, 0.2, 0.5) == pytest.approx(0.35)
    assert threshold(4, 5, 0.2, 0.5) == pytest.approx(0.2)
    # epochs over the replayed stream: 32 images, batch 8 -> 4 steps per epoch; 20 steps -> 5 epochs
    sched = ReliabilitySchedule(0.2, 0.5, steps=20, batch_size=8, num_images=32)
    assert sched.epochs == 5
    assert [sched.epoch(s) for s in (1, 4, 5, 12, 20)] == [0, 0, 1, 2, 4]
    assert sched.threshold(1) == pytest.approx(0.5) and sched.threshold(20) == pytest.approx(0.2)
    assert sched.threshold(9) == pytest.approx(0.35)
    assert ReliabilitySchedule(0.2, 0.5, steps=1, batch_size=8, num_images=32).thresholds() == [0.5]


# -- the loss terms ------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential()
        self.features.add_module("init", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        stage = nn.Sequential()
        stage.add_module("unit1", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        stage.add_module("unit2", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
        self.features.add_module("stage1", stage)
        self.output = nn.Linear(8, 4)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.output(self.features(x).mean((2, 3)))


def _refine_cfg(compose, *overrides):
    return compose("refine=plf", *overrides).refine


def test_stage_and_unit_rules():
    assert stage_modules(Net()) == ["features.stage1"]
    assert unit_modules(Net()) == ["features.stage1.unit1", "features.stage1.unit2"]


def test_resnet20_stages_and_units(resnet20):
    assert stage_modules(resnet20) == ["features.stage1", "features.stage2", "features.stage3"]
    units = unit_modules(resnet20)
    assert len(units) == 9 and units[0] == "features.stage1.unit1" and units[-1] == "features.stage3.unit3"


def test_channel_attention_is_normalized_channel_energy():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 2.0  # all energy in channel 0
    x[1] = 1.0     # equal energy in every channel
    att = channel_attention(x)
    assert torch.allclose(att[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(att[1], torch.full((3,), 3 ** -0.5))
    assert torch.allclose(channel_attention(5 * x), att)  # scale-free: mu's scale does not depend on it


@pytest.mark.parametrize("name", ["plf_high", "plf_low", "plf_mse"])
def test_each_term_has_a_gradient_into_the_quantized_model_and_none_into_the_fp_model(compose, name):
    cfg = _refine_cfg(compose)
    teacher = Net().eval()
    student = quant.quantize(teacher, QuantConfig(name="dfq_legacy"), 4, 4)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    quant.calibrate(student, [x], "cpu")
    term = {"plf_high": HighReliableCE, "plf_low": LowReliableCE, "plf_mse": FeatureMSE}[name](cfg)
    term.setup(RefinePlan(steps=4, batch_size=16, num_images=16, student=student, teacher=teacher))
    feats = {"student": {}, "teacher": {}}
    hooks = []
    for role, model in (("student", student), ("teacher", teacher)):
        mods = dict(model.named_modules())
        for m in term.feature_modules:
            hooks.append(mods[m].register_forward_hook(
                lambda mod, i, o, role=role, m=m: feats[role].__setitem__(m, o)))
    # Sharpen the teacher's logits on half the batch so both splits are populated.
    with torch.no_grad():
        t_logits = teacher(x)
    t_logits[:8] *= 50.0
    t_logits[8:] *= 0.0
    s_logits = student(x)
    out = StepOutputs(s_logits, t_logits, None, feats["student"], feats["teacher"], step=1)
    value = term(out)
    value.backward()
    assert float(value.detach()) > 0
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    for h in hooks:
        h.remove()


def test_empty_split_contributes_zero_and_keeps_the_graph(compose):
    cfg = _refine_cfg(compose)
    term = HighReliableCE(cfg)
    term.setup(RefinePlan(steps=1, batch_size=4, num_images=4, student=None, teacher=None))
    s = torch.randn(4, 10, requires_grad=True)
    out = StepOutputs(s, torch.zeros(4, 10), step=1)  # uniform teacher: entropy 1 > every threshold
    value = term(out)
    assert float(value) == 0.0 and value.requires_grad


def test_high_term_is_the_ce_to_the_argmax_of_the_confident_samples(compose):
    cfg = _refine_cfg(compose)
    term = HighReliableCE(cfg)
    term.setup(RefinePlan(steps=1, batch_size=2, num_images=2, student=None, teacher=None))
    teacher = torch.tensor([[0.0, 20.0, 0.0], [0.0, 0.0, 0.0]])  # confident on class 1 | uniform
    student = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    value = term(StepOutputs(student, teacher, step=1))
    assert float(value) == pytest.approx(float(F.cross_entropy(student[:1], torch.tensor([1]))))


@pytest.mark.parametrize("overrides, dropped", [
    (("strategy.use_high=false",), {"plf_high"}),
    (("strategy.use_low=false",), {"plf_low"}),
    (("strategy.beta=0",), {"plf_low"}),
    (("strategy.mu=0",), {"plf_mse"}),
    (("strategy.use_high=false", "strategy.use_low=false"), {"plf_high", "plf_low"}),
])
def test_ablation_switches_remove_exactly_their_terms(compose, overrides, dropped):
    full = refine.build(compose("strategy=plf").refine)
    ablated = refine.build(compose("strategy=plf", *overrides).refine)
    names = lambda r: {n for n, _, _ in r.terms()}  # noqa: E731
    assert names(full) == {"kd", "plf_high", "plf_low", "plf_mse"}
    assert names(full) - names(ablated) == dropped


def test_objective_weights_are_eq_15(compose):
    cfg = compose("strategy=plf", "strategy.tau=2", "strategy.beta=0.25", "strategy.mu=10").refine
    assert plf_weights(cfg) == {"plf_high": 2.0, "plf_low": 0.5, "plf_mse": 20.0}
    assert refine.build(cfg).weights(cfg)["kd"] == 1.0


# -- configuration -------------------------------------------------------------------------------
def test_family_defaults_follow_the_dataset(compose):
    cifar = compose("strategy=plf")
    assert (cifar.strategy.gamma, cifar.refine.plf.t_low, cifar.refine.plf.t_high, cifar.refine.plf.beta,
            cifar.refine.plf.mu, cifar.refine.plf.tau, cifar.refine.lr) == (10.0, 0.2, 0.5, 0.3, 100.0, 1.0, 1e-3)
    inet = compose("strategy=plf", "model=resnet18")
    assert inet.dataset.family == "imagenet"
    assert (inet.strategy.gamma, inet.refine.plf.t_low, inet.refine.plf.t_high, inet.refine.plf.beta,
            inet.refine.plf.mu, inet.refine.plf.tau, inet.refine.lr) == (0.1, 0.1, 0.4, 0.5, 4000.0, 1.0, 1e-5)
    # refine=plf on another strategy's data takes the same family defaults
    zq = compose("strategy=zeroq", "refine=plf")
    assert (zq.refine.plf.t_low, zq.refine.plf.mu, zq.refine.lr) == (0.2, 100.0, 1e-3)
    # strategy.* routes into the refinement stage
    assert compose("strategy=plf", "strategy.mu=0").refine.plf.mu == 0.0
    assert compose("strategy=plf").refine.momentum == 0.9 and compose("strategy=plf").refine.weight_decay == 1e-4


@pytest.mark.parametrize("overrides, needle", [
    (("strategy=plf", "strategy.t_low=0.6"), "t_low=0.6 > strategy.t_high=0.5"),
    (("strategy=plf", "strategy.t_high=1.5"), "strategy.t_high=1.5 is out of range"),
    (("strategy=plf", "strategy.t_low=-0.1"), "strategy.t_low=-0.1 is out of range"),
    (("strategy=plf", "strategy.beta=-1"), "strategy.beta=-1"),
    (("strategy=plf", "strategy.mu=-1"), "strategy.mu=-1"),
    (("strategy=plf", "strategy.tau=-1"), "strategy.tau=-1"),
    (("strategy=plf", "strategy.gamma=-1"), "strategy.gamma=-1"),
    (("strategy=zeroq", "refine=plf", "refine.plf.t_low=0.9"), "refine.plf.t_low=0.9 > refine.plf.t_high"),
    (("strategy=zeroq", "refine=plf", "refine.plf.features=layers"), "valid choices: stages, units, hast, bn, list"),
    (("strategy=zeroq", "refine=plf", "refine.plf.feature_map=gram"), "valid choices: attention, raw"),
    (("strategy=plf", "strategy.lr_schedule=step"), "valid choices: plateau, cosine"),
])
def test_bad_input_is_one_clear_error_before_any_work(compose, overrides, needle):
    cfg = compose(*overrides)
    with pytest.raises(ConfigError, match=None) as err:
        validate(cfg)
        refine.validate(cfg)
        strategies.build(cfg.strategy)
    assert needle in str(err.value)


def test_plf_refuses_a_stream_without_a_fixed_set_to_score(compose):
    from calibbench.refine.plf import check_stream
    from calibbench.strategies.base import Strategy

    class Fresh(Strategy):
        name = "fresh"

        def calibration_set(self, ctx):  # noqa: ANN001, ANN201
            raise NotImplementedError

        def batches(self, ctx, calib, batch_size, generator):  # noqa: ANN001, ANN201
            while True:
                yield torch.randn(batch_size, 3, 8, 8), None

    with pytest.raises(ConfigError, match="strategy=fresh streams fresh generator images.*no logits source"):
        check_stream(Fresh(None))
    for name in ("zeroq", "random", "gdfq"):  # a fixed set (gdfq: the warmed-up generator's sample)
        check_stream(strategies.build(compose(f"strategy={name}").strategy))


def test_cli_bad_threshold_exits_nonzero_without_a_result(tmp_path):
    from test_cli import cli, results

    proc = cli(tmp_path, "strategy=plf", "budget=smoke", "strategy.t_low=0.7")
    assert proc.returncode != 0
    assert "t_low=0.7 > strategy.t_high=0.5" in proc.stderr + proc.stdout
    assert not [r for r in results(tmp_path) if r.get("status") == "ok"]


# -- synthesis ------------------------------------------------------------------------------------
def test_synthesis_uses_batch_statistics_ce_and_balanced_labels(compose, make_ctx, resnet20, cifar):
    cfg = compose(*SMOKE)
    strat = strategies.build(cfg.strategy)
    ctx = make_ctx(resnet20, cifar, plf_samples=20, plf_iterations=3, synth_batch_size=10)
    calib = strat.calibration_set(ctx)
    assert calib.images.shape == (20, 3, 32, 32) and len(calib) == strat.num_images(ctx) == 20
    assert torch.bincount(calib.labels, minlength=10).tolist() == [2] * 10
    info = calib.info
    assert info["bn_stats"] == "batch" and info["gamma"] == 10.0
    assert set(info["loss_terms"]) == {"total", "bn", "ce"}
    for losses in info["losses"]["total"]:
        assert losses[-1] < losses[0]
    assert 0.0 <= info["fp_agrees_with_label"] <= 1.0


def test_refinement_keys_stay_out_of_the_calibration_key(compose):
    a = strategies.build(compose(*SMOKE).strategy)
    b = strategies.build(compose(*SMOKE, "strategy.mu=0", "strategy.use_low=false", "strategy.lr=0.01").strategy)
    c = strategies.build(compose(*SMOKE, "strategy.gamma=1").strategy)
    ctx = None
    assert a.resolved_config(ctx) == b.resolved_config(ctx)
    assert a.resolved_config(ctx) != c.resolved_config(ctx)


# -- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.needs_shared
def test_plf_end_to_end_is_deterministic_and_records_the_split(compose, tmp_path):
    a, _ = run_twice(compose, tmp_path, *SMOKE)
    r = a["refine"]
    assert a["status"] == "ok" and r["name"] == "plf"
    assert set(r["terms"]) == {"kd", "plf_high", "plf_low", "plf_mse"}
    assert {"kd", "plf_high", "plf_low", "plf_mse"} <= set(r["curve"])
    plf = r["plf"]
    assert plf["epochs"] == math.ceil(3 * 16 / 16)
    assert plf["threshold_per_epoch"][0] == 0.5 and plf["threshold_per_epoch"][-1] == 0.2
    assert all(h + lo == 16 for h, lo in zip(plf["high_per_epoch"], plf["low_per_epoch"]))
    assert plf["high_per_epoch"] == sorted(plf["high_per_epoch"], reverse=True)  # t only falls
    assert sum(plf["entropy_hist"]["counts"]) == 16


@pytest.mark.slow
@pytest.mark.needs_shared
def test_plf_objective_on_zeroq_data(compose, tmp_path):
    from calibbench.pipeline import run

    cfg = compose("strategy=zeroq", "refine=plf", "budget=smoke", "num_samples=16",
                  f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'c'}")
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "ok" and rec["refine"]["name"] == "plf" and "plf" in rec["refine"]


def test_calibration_budget_view_has_the_plf_fields(compose):
    view = calibration_budget(compose("budget=paper").budget)
    assert (view.plf_samples, view.plf_iterations) == (5120, 1000)


def test_pseudo_label_terms_compose_with_plain_kd(compose):
    cfg = compose("strategy=random", "refine=kd", "+refine.losses.plf_high=1.0", "+refine.losses.plf_low=0.3").refine
    assert {n for n, _, _ in refine.build(cfg).terms()} == {"kd", "plf_high", "plf_low"}


def test_low_term_is_eq9_on_hand_made_logits(compose):
    """eq. 8-10 by hand on a batch of three: two low-reliable samples (normalized entropy > T_u =
    0.5 at the first epoch) and a confident one, which eq. 9 leaves out. Sample 0: teacher
    probabilities (0.3, 0.25, 0.15, ...), primary 0, secondary 1, lambda = 0.3/0.55, 0.25/0.55;
    sample 1: primary 3 (0.4), secondary 8 (0.2), lambda = 2/3, 1/3. The quantized model's own
    top-2 (classes 1, 7 and 0, 9) are not the labels: the labels are the FP model's. eq. 9 is the
    mean over the N_l = 2 low-reliable samples (not the batch of 3, not a sum)."""
    cfg = _refine_cfg(compose)
    assert (cfg.plf.t_low, cfg.plf.t_high) == (0.2, 0.5)  # CIFAR's
    term = LowReliableCE(cfg)
    term.setup(RefinePlan(steps=1, batch_size=3, num_images=3, student=None, teacher=None))
    probs = torch.tensor([[0.3, 0.25, 0.15, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0],
                          [0.05, 0.1, 0.02, 0.4, 0.03, 0.05, 0.05, 0.05, 0.2, 0.05],
                          [1.0 - 9e-6] + [1e-6] * 9])
    entropy = self_entropy(probs)
    assert entropy[0] > 0.5 and entropy[1] > 0.5 and entropy[2] < 0.2
    t_logits = torch.log(probs.clamp(min=1e-12))
    s_logits = torch.tensor([[0.2, 1.0, -0.5, 0.1, 0.0, 0.3, -1.0, 0.4, 0.0, 0.2],
                             [2.0, 0.1, 0.3, -0.2, 0.0, 0.5, -1.0, 0.4, 0.0, 1.5],
                             [-3.0] + [0.5] * 9], requires_grad=True)
    out = StepOutputs(s_logits, t_logits, step=1)
    log_q = torch.log_softmax(s_logits.detach(), 1)
    low_0 = -(0.3 / 0.55) * log_q[0, 0] - (0.25 / 0.55) * log_q[0, 1]
    low_1 = -(0.4 / 0.6) * log_q[1, 3] - (0.2 / 0.6) * log_q[1, 8]
    want = (low_0 + low_1) / 2
    value = term(out)
    assert float(value.detach()) == pytest.approx(float(want), rel=1e-5)
    # the confident sample gets no gradient from eq. 9; the low-reliable ones do
    value.backward()
    assert torch.equal(s_logits.grad[2], torch.zeros(10)) and bool((s_logits.grad[:2] != 0).all())


def test_hast_features_are_the_unit_bodies(compose):
    """refine.plf.features=hast hooks HAST's layers: on resnet20 the 9 ResUnit.body outputs
    (before the residual add), in the FP and the quantized model; the default stays ``stages``."""
    from pytorchcv.model_provider import get_model

    from calibbench.refine.plf import hast_modules

    teacher = get_model("resnet20_cifar10", pretrained=False).eval()
    bodies = [f"features.stage{s}.unit{u}.body" for s in (1, 2, 3) for u in (1, 2, 3)]
    assert hast_modules(teacher) == bodies
    student = quant.quantize(teacher, QuantConfig(name="dfq_legacy"), 4, 4)
    assert _refine_cfg(compose).plf.features == "stages"
    cfg = _refine_cfg(compose, "refine.plf.features=hast")
    term = FeatureMSE(cfg)
    term.setup(RefinePlan(steps=1, batch_size=2, num_images=2, student=student, teacher=teacher))
    assert term.feature_modules == tuple(bodies)
    # a body's output is the residual branch alone: the unit adds the identity and applies ReLU
    unit = teacher.features.stage1.unit2
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(unit(x), torch.relu(unit.body(x) + x))
        assert float(unit.body(x).min()) < 0  # before the activation
    # HAST's other two hooks, and the fallback to the units for blocks HAST does not hook
    v2 = hast_modules(get_model("mobilenetv2_w1", pretrained=False))
    assert len(v2) == 17 and all(n.endswith(".conv3") for n in v2)
    v1 = hast_modules(get_model("mobilenet_w1", pretrained=False))
    assert len(v1) == 13 and all(n.endswith(".pw_conv.bn") for n in v1)
    assert hast_modules(Net()) == unit_modules(Net())
