"""ClusterQ (paper semantics): centroids from BN statistics, the EMA update on correctly classified
samples, the alignment and diversity terms, the alternating stage, records, determinism, bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import run_twice
from test_generator import SMOKE, build_strategy, refine_w4a4, smoke_run, tiny_gen_ctx
from test_refine import _qweights, _same, _state

from calibbench import refine, strategies
from calibbench.bnstats import BNStatsRecorder, BNTargets, find_bn_layers
from calibbench.config import ConfigError, validate
from calibbench.generative.clusterq import AlignTerm, ClusterQConfig, DiversityTerm, ema_update
from calibbench.generative.network import build_generator
from calibbench.generative.strategy import class_stats, deep_start
from calibbench.generative.terms import GenStepOutputs, build_gen_terms

TERMS = ("ce", "bns", "align", "diversity")



def _clusterq(compose, *overrides):
    return build_strategy(compose, "clusterq", *overrides)


_tiny = tiny_gen_ctx


def _outputs(image_means, image_stds, labels, logits, state, layers=1):
    """A hand-made step: one deep layer (deep_start 0) with the given per-image stats."""
    bn_image = [(image_means, image_stds)] * layers
    return GenStepOutputs(torch.zeros(len(labels)), labels, logits, [], BNTargets([], [], []), 5,
                          bn_image, state)


def _state_for(num_classes, channels, mean=0.0, std=1.0):
    return {"centroid_mean": torch.full((num_classes, channels), mean),
            "centroid_std": torch.full((num_classes, channels), std),
            "ema_updates": torch.zeros(num_classes, dtype=torch.long),
            "deep_start": 0, "deep_channels": [channels]}


# -- pieces --------------------------------------------------------------------------------------
def test_deep_layers_start_at_ceil_half_minus_two():
    assert [deep_start(n, "zero_based") for n in (1, 2, 4, 5, 19, 21)] == [0, 0, 0, 1, 8, 9]
    assert [deep_start(n, "one_based") for n in (1, 5, 21)] == [0, 0, 8]


def test_class_stats_pool_images_as_a_bn_layer_sees_the_class_subset():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    labels = torch.tensor([2, 0, 2, 2, 0, 2])
    eps = 1e-5
    mean = x.mean((2, 3))
    std = torch.sqrt(x.var((2, 3), unbiased=False) + eps)
    present, cmean, cstd = class_stats(mean, std, labels)
    assert present.tolist() == [0, 2]
    for row, c in enumerate((0, 2)):
        sub = x[labels == c]
        assert torch.allclose(cmean[row], sub.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(cstd[row], torch.sqrt(sub.var((0, 2, 3), unbiased=False) + eps), atol=1e-5)


def test_ema_update_equals_the_formula_and_skips_misclassified_samples():
    """Two classes present; image 2 (class 1) is misclassified and must not count; class 2 has
    only a misclassified image and keeps its centroid; class 0 is absent."""
    state = _state_for(3, 2, mean=1.0, std=2.0)
    m = torch.tensor([[3.0, 5.0], [7.0, 1.0], [100.0, 100.0], [4.0, 4.0], [50.0, 50.0]])
    s = torch.tensor([[1.0, 1.0], [2.0, 3.0], [9.0, 9.0], [1.0, 1.0], [9.0, 9.0]])
    labels = torch.tensor([1, 1, 1, 0, 2])
    logits = torch.eye(3)[torch.tensor([1, 1, 0, 0, 0])] * 5  # image 2 -> 0 (wrong), image 4 -> 0 (wrong)
    updated, shift = ema_update(state, _outputs(m, s, labels, logits, state), decay=0.2)
    # class 1 from images 0 and 1: mean (5, 3); std sqrt(avg s^2 + avg (m - mean)^2)
    c1_mean = torch.tensor([5.0, 3.0])
    c1_std = torch.sqrt(torch.tensor([(1 + 4) / 2 + (4 + 4) / 2, (1 + 9) / 2 + (4 + 4) / 2]))
    assert torch.allclose(state["centroid_mean"][1], 0.8 * torch.tensor([1.0, 1.0]) + 0.2 * c1_mean)
    assert torch.allclose(state["centroid_std"][1], 0.8 * torch.tensor([2.0, 2.0]) + 0.2 * c1_std)
    # class 0 from image 3 alone: mean (4, 4), std (1, 1)
    assert torch.allclose(state["centroid_mean"][0], torch.tensor([0.8 + 0.8, 0.8 + 0.8]))
    assert torch.allclose(state["centroid_std"][0], torch.tensor([1.6 + 0.2, 1.6 + 0.2]))
    # class 2: its only image is misclassified -> unchanged
    assert torch.equal(state["centroid_mean"][2], torch.tensor([1.0, 1.0]))
    assert torch.equal(state["centroid_std"][2], torch.tensor([2.0, 2.0]))
    assert state["ema_updates"].tolist() == [1, 1, 0] and updated == 2
    d1 = torch.cat([0.2 * (c1_mean - 1), 0.2 * (c1_std - 2)])
    d0 = torch.tensor([0.6, 0.6, -0.2, -0.2])
    expected = (d1.pow(2).mean().sqrt() + d0.pow(2).mean().sqrt()) / 2
    assert shift == pytest.approx(float(expected))
    # nothing correct: nothing changes
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    wrong = torch.eye(3)[torch.tensor([2, 2, 2, 2, 1])]
    assert ema_update(state, _outputs(m, s, labels, wrong, state), 0.2) == (0, 0.0)
    assert all(torch.equal(before[k], state[k]) for k in before)


def test_align_term_is_class_statistics_to_centroids(compose):
    _, strategy = _clusterq(compose)
    state = _state_for(3, 2, mean=1.0, std=2.0)
    state["centroid_mean"][2] = torch.tensor([0.0, 4.0])
    m = torch.tensor([[1.0, 3.0], [3.0, 3.0], [0.0, 0.0]])
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    labels = torch.tensor([2, 2, 1])
    out = _outputs(m, s, labels, torch.zeros(3, 3), state)
    # class 1: mean (0, 0) vs (1, 1) -> 1; std (2, 2) vs (2, 2) -> 0
    # class 2: mean (2, 3) vs (0, 4); var (1 + 1, 1 + 0) = (2, 1) vs 2^2 = 4
    strategy.cfg.bns_moment = "var"
    expected = (1 + 1 + 4 + 1) / 4 + (0 + 0 + 4 + 9) / 4
    assert float(AlignTerm(strategy.cfg)(out)) == pytest.approx(expected)


def test_diversity_targets_are_the_centroids_plus_noise_with_the_configured_variances(compose):
    """Zero noise: the image-level term is the per-image MSE to the centroid; with noise, its mean
    over many draws adds the noise variances (E[(x - c - e)^2] = (x - c)^2 + v)."""
    _, strategy = _clusterq(compose, "strategy.bns_moment=std")
    state = _state_for(2, 3, mean=0.5, std=1.5)
    m, s = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0]]), torch.tensor([[1.0, 2.0, 1.5], [1.5, 1.5, 1.5]])
    out = _outputs(m, s, torch.tensor([0, 1]), torch.zeros(2, 2), state)
    cfg = strategy.cfg
    cfg.div_var_mean, cfg.div_var_std = 0.0, 0.0
    base = ((m - 0.5).pow(2).mean() + (s - 1.5).pow(2).mean())
    # image level: an image's spread about the centroid mean, sqrt(s^2 + (m - c)^2) (issue 21)
    image = ((m - 0.5).pow(2).mean() + (torch.sqrt(s.pow(2) + (m - 0.5).pow(2)) - 1.5).pow(2).mean())
    assert float(DiversityTerm(cfg)(out)) == pytest.approx(float(image))
    cfg.div_var_mean, cfg.div_var_std = 0.5, 1.0
    torch.manual_seed(0)
    draws = torch.stack([DiversityTerm(cfg)(out) for _ in range(4000)])
    assert float(draws.mean()) == pytest.approx(float(image) + 1.5, rel=0.03)
    cfg.div_level = "class"
    cfg.div_var_mean, cfg.div_var_std = 0.0, 0.0
    assert float(DiversityTerm(cfg)(out)) == pytest.approx(float(base))  # one image per class


@pytest.mark.parametrize("name", TERMS)
def test_each_term_reaches_the_generator_and_not_the_fp_model(compose, make_ctx, name):
    _, strategy = _clusterq(compose, *[f"strategy.losses.{t}={float(t == name)}" for t in TERMS])
    teacher, ctx = _tiny(make_ctx)
    teacher.requires_grad_(False)
    gen = build_generator(10, 10, 8)
    (term_name, _, term), = build_gen_terms(strategy.cfg)
    assert term_name == name
    layers = find_bn_layers(teacher)
    state = strategy.setup_state(ctx, layers)
    state["centroid_mean"] += torch.randn(state["centroid_mean"].shape)  # classes apart
    with BNStatsRecorder(teacher, layers=layers, per_image=True, per_batch=True, correction=0) as rec:
        y = torch.arange(8) % 3
        images = gen(torch.randn(8, 100), y)
        out = GenStepOutputs(images, y, teacher(images), rec.batch_stats(), rec.targets(), 1,
                             rec.image_stats(), state)
    value = term(out)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    grads = [p.grad for p in gen.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not state["centroid_mean"].requires_grad


def test_centroids_start_at_the_bn_statistics_of_the_deep_layers(compose, make_ctx):
    _, strategy = _clusterq(compose)
    teacher, ctx = _tiny(make_ctx)
    layers = find_bn_layers(teacher)
    state = strategy.setup_state(ctx, layers)
    k = deep_start(len(layers), "zero_based")
    assert state["deep_start"] == k == 0 and state["deep_channels"] == [8, 8]
    running_mean = torch.cat([bn.running_mean for _, bn in layers[k:]])
    running_std = torch.cat([torch.sqrt(bn.running_var + bn.eps) for _, bn in layers[k:]])
    assert state["centroid_mean"].shape == (10, 16)
    assert torch.equal(state["centroid_mean"], running_mean.expand(10, -1))
    assert torch.allclose(state["centroid_std"], running_std.expand(10, -1))


# -- the strategy and its stage ------------------------------------------------------------------
def test_clusterq_smoke_trains_the_quantized_model_and_records_the_centroids(compose, make_ctx, monkeypatch):
    import dataclasses

    from calibbench.generative import clusterq

    # Every synthetic image counts as correctly classified, so the EMA runs at every step after
    # its warm-up and the assertions below cannot pass on an EMA that never ran.
    original = clusterq.ema_update
    calls: list[int] = []

    def always_correct(state, out, decay):  # noqa: ANN001, ANN202
        calls.append(out.step)
        logits = torch.nn.functional.one_hot(out.labels, out.logits.shape[1]).float()
        return original(state, dataclasses.replace(out, logits=logits), decay)

    monkeypatch.setattr(clusterq, "ema_update", always_correct)
    cfg, strategy = _clusterq(compose, "refine.lr=0.05", "strategy.ema_warmup_steps=1")
    assert cfg.refine.name == "clusterq" and cfg.refine.temperature == 20.0
    teacher, ctx = _tiny(make_ctx, warmup=2, steps=3)
    before = _state(teacher)
    init = strategy.setup_state(ctx, find_bn_layers(teacher))  # the centroids before any EMA
    calib = strategy.calibration_set(ctx)
    info = calib.info
    assert info["warmup_steps"] == 2 and info["ema_warmup_steps"] == 1
    assert info["images_generated"] == 2 * 8 + 16 == sum(info["per_class_counts"])
    assert {"generator/align", "generator/diversity", "generator/ce", "generator/bns"} <= set(info["warmup_curve"])
    assert info["centroid_shift"]["step"] == [2]  # one EMA update: step 2, after the warm-up step
    assert info["centroid_shift"]["classes_updated"][0] > 0 and info["centroid_shift"]["shift"][0] > 0
    # the EMA changed the centroids the strategy carries on (not a copy): the updated classes
    # moved off their BN-statistics start, the others kept it
    warm = calib.state["strategy"]
    updated = warm["ema_updates"] > 0
    assert calls == [2] and int(updated.sum()) == info["centroid_shift"]["classes_updated"][0] > 0
    for key in ("centroid_mean", "centroid_std"):
        assert (warm[key][updated] != init[key][updated]).any(dim=1).all(), key
        assert torch.equal(warm[key][~updated], init[key][~updated]), key
    warm = {k: v.clone() for k, v in warm.items() if isinstance(v, torch.Tensor)}
    final: dict = {}  # the state the refinement ends with, as handed to refinement_record
    record = clusterq.ClusterQ.refinement_record
    monkeypatch.setattr(clusterq.ClusterQ, "refinement_record",
                        lambda self, state: final.update(state) or record(self, state))
    rec = refine_w4a4(teacher, strategy, ctx, calib, cfg, before)
    assert _same(before, _state(teacher))
    assert rec["steps"] == 3 and rec["curve"]["step"] == [3, 4, 5]
    assert {"generator/align", "generator/diversity", "kd", "ce", "loss"} <= set(rec["curve"])
    shift = rec["centroid_shift"]
    assert set(shift) == {"step", "classes_updated", "shift"} and shift["step"] == [3, 4, 5]
    assert all(math.isfinite(v) and v > 0 for v in shift["shift"]) and all(shift["classes_updated"])
    assert sum(rec["ema_updates_per_class"]) == sum(shift["classes_updated"]) + sum(
        info["centroid_shift"]["classes_updated"])
    # the refinement's EMA continued from the warmed-up centroids and moved them further
    assert calls == [2, 3, 4, 5]
    again = final["ema_updates"].cpu() > warm["ema_updates"]
    assert bool(again.any())
    for key in ("centroid_mean", "centroid_std"):
        assert (final[key].cpu()[again] != warm[key][again]).any(dim=1).all(), key
        assert torch.equal(final[key].cpu()[~again], warm[key][~again]), key


def test_shift_record_is_thinned(compose):
    _, strategy = _clusterq(compose)
    strategy.shifts = [(i, 1, 0.1) for i in range(1, 1001)]
    rec = strategy.shift_record(max_points=50)
    assert len(rec["step"]) == 50 and rec["step"][0] == 1 and rec["step"][-1] == 1000


@pytest.mark.needs_shared
def test_same_seed_same_run_and_the_run_changes_the_quantized_weights(compose, tmp_path, monkeypatch):
    changed = []
    real = refine.run

    def watched(qmodel, *args, **kwargs):  # noqa: ANN001, ANN202
        before = _qweights(qmodel)
        out = real(qmodel, *args, **kwargs)
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, _qweights(qmodel))))
        return out

    monkeypatch.setattr(refine, "run", watched)

    a, b = run_twice(compose, tmp_path, *SMOKE, "strategy=clusterq")
    assert changed == [True, True]
    assert a["refine"]["centroid_shift"] == b["refine"]["centroid_shift"]
    assert a["calibration"]["info"]["warmup_curve"] == b["calibration"]["info"]["warmup_curve"]
    assert a["refine"]["name"] == "clusterq" and a["refine"]["steps"] == 3


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["refine=none"], "strategy=clusterq with refine=none"),
    (["strategy.ema_decay=0"], "strategy clusterq ema_decay=0.0 must be in (0, 1]"),
    (["strategy.div_var_std=-1"], "strategy clusterq div_var_std=-1.0 is a variance"),
    (["strategy.div_level=batch"], "unknown strategy clusterq div_level 'batch'"),
    (["strategy.ema_warmup_steps=-2"], "strategy clusterq ema_warmup_steps=-2 must be >= 0"),
    (["strategy.k_indexing=two"], "unknown strategy clusterq k_indexing 'two'"),
])
def test_bad_clusterq_config_is_one_clear_error(compose, overrides, message):
    cfg = compose(*SMOKE, "strategy=clusterq", *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)
        refine.validate(cfg)
        strategies.build(cfg.strategy).check_run(cfg)


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.mark.needs_shared
def test_clusterq_end_to_end_changes_the_quantized_model(compose, tmp_path):
    record = smoke_run(compose, tmp_path, "strategy=clusterq", "budget.eval_limit=100")
    assert record["status"] == "ok" and record["refine"]["name"] == "clusterq"
    assert record["calibration"]["strategy"] == "clusterq" and record["calibration"]["synthetic"]
    curve = record["refine"]["curve"]
    assert {"generator/align", "generator/diversity", "kd"} <= set(curve) and record["refine"]["images_seen"] == 48
    assert curve["loss"][0] != curve["loss"][-1]  # the quantized model trained (its loss moved)
    assert record["refine"]["centroid_shift"]["step"] and record["calibration"]["info"]["deep_start"] == 9


@pytest.mark.parametrize("moment", ["var", "std"])
def test_diversity_target_is_unbiased_for_the_moment(moment):
    """E[target] is the centroid for the compared moment: the default (var) used to add N(0, 1) to
    the std and square it, E = sigma^2 + 1."""
    from calibbench.generative.clusterq import ClusterQConfig, diversity_targets

    assert ClusterQConfig().bns_moment == "var"
    t_mean, t_std = torch.full((200_000, 1), 0.3), torch.full((200_000, 1), 0.5)
    d_mean, d_spread = diversity_targets(t_mean, t_std, 0.5, 1.0, moment, torch.Generator().manual_seed(0))
    assert float(d_mean.mean()) == pytest.approx(0.3, abs=0.01)
    want = 0.25 if moment == "var" else 0.5
    assert float(d_spread.mean()) == pytest.approx(want, abs=0.01)
    assert float(d_spread.var()) == pytest.approx(1.0, rel=0.02)


def test_image_level_diversity_compares_the_spread_about_the_class_mean():
    """At div_level=image the image's spread about the centroid mean is compared with the
    centroid's pooled std: images whose means differ but whose own std is 0 are not 'too narrow'."""
    from calibbench.generative.clusterq import DiversityTerm

    cfg = ClusterQConfig(div_var_mean=1e-12, div_var_std=1e-12, div_level="image", bns_moment="std")
    means = torch.tensor([[-1.0], [1.0]])
    stds = torch.zeros(2, 1)
    state = {"centroid_mean": torch.zeros(1, 1), "centroid_std": torch.ones(1, 1), "deep_channels": [1],
             "deep_start": 0}
    out = _outputs(means, stds, torch.tensor([0, 0]), torch.zeros(2, 1), state)
    # the means' term (m - 0)^2 = 1; the spread term sqrt(0 + 1) vs 1 is 0 (it was (0 - 1)^2 = 1)
    assert float(DiversityTerm(cfg)(out)) == pytest.approx(1.0, abs=1e-5)
