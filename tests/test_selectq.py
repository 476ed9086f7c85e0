"""SelectQ: the clustering maths on hand-made numbers, the one-pass design against a literal
second traversal, and end-to-end selection on three architectures and on real CIFAR-10."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from conftest import SHARED, tiny_datamodule
from omegaconf import OmegaConf
from torch import nn

from calibbench.config import ConfigError
from calibbench.strategies import build
from calibbench.strategies.selectq import (ActivationStats, SelectQ, SelectQConfig, StatsLayout,
                                           knowledge_distance, lambda_schedule, pool_and_order,
                                           rank, score, score_pool, update_centroids,
                                           update_centroids_per_image, validate)

CIFAR_DIR = SHARED / "data" / "cifar10-jpeg"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine its
    barriers made this file several times slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_resnet20() -> nn.Module:
    from pytorchcv.model_provider import get_model

    return get_model("resnet20_cifar10", pretrained=False).eval()


def selectq(**fields) -> SelectQ:  # noqa: ANN003
    return build(SelectQConfig(**fields))  # type: ignore[return-value]


def flat(*layers: list[tuple[float, float]]) -> torch.Tensor:
    """Layer-mode stats/centroids in the flat layout: rows are images/centroids,
    columns [μ of each layer…, σ of each layer…]; ``layers[l][row] = (μ, σ)``."""
    rows = len(layers[0])
    mu = [[layers[l][r][0] for l in range(len(layers))] for r in range(rows)]
    sigma = [[layers[l][r][1] for l in range(len(layers))] for r in range(rows)]
    return torch.tensor([m + s for m, s in zip(mu, sigma)], dtype=torch.float32)


# ---------------------------------------------------------------- maths by hand


def test_lambda_schedule_endpoints_and_monotone_decrease() -> None:
    lam = lambda_schedule(40, 0.1, 0.001)
    assert len(lam) == 40
    assert lam[0] == pytest.approx(0.1, rel=1e-12)
    assert lam[-1] == pytest.approx(0.001, rel=1e-12)
    assert all(a > b for a, b in zip(lam, lam[1:]))
    assert lam[20] == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 20 / 39)))
    assert lambda_schedule(1, 0.1, 0.001) == [0.1]  # one batch: t / t_max := 0
    # The text's t_max = number of batches: the last step stays above λ_min.
    text = lambda_schedule(4, 0.1, 0.001, "num_batches")
    assert text[0] == pytest.approx(0.1) and text[-1] > 0.001
    assert text[-1] == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 3 / 4)))


def test_knowledge_distance_by_hand() -> None:
    # layer a: 1 channel, layer b: 2 channels; entries [μa, μb1, μb2, σa, σb1, σb2]; γ = 2.
    layout = StatsLayout.build(["a", "b"], [1, 2], gamma=2.0)
    stats = torch.tensor([[1.0, 1.0, 2.0, 3.0, 0.0, 1.0]])
    centroids = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
                              [1.0, 1.0, 2.0, 3.0, 0.0, 1.0]])
    d = knowledge_distance(stats, centroids, layout)
    # a: (1−0)² + 2·(3−1)² = 9;  b: (1² + 2²) + 2·((0−1)² + (1−1)²) = 7
    assert d.tolist() == [[[9.0, 7.0], [0.0, 0.0]]]
    total, idx = score(stats + torch.tensor([[0, 0, 0, 0, 0, 1.0]]), centroids, layout)
    assert idx.tolist() == [[1, 1]] and total.tolist() == [2.0]  # γ·1² on σb2


def test_batched_update_by_hand() -> None:
    layout = StatsLayout.build(["a", "b"], [1, 1], gamma=1.0)
    # Centroids (μ, σ) per layer; centroid 2 is far away and gets no assignment.
    c = flat([(0, 1), (4, 2), (100, 100)], [(10, 0), (0, 0), (100, 100)])
    s = flat([(1, 1), (3, 1), (1, 3)], [(0, 0), (10, 1), (0, 2)])
    d = knowledge_distance(s, c, layout)
    idx = d.argmin(1)
    # layer a: s1→0 (D 1 vs 10), s2→1 (9 vs 2), s3→0 (5 vs 10); layer b: s1→1, s2→0, s3→1
    assert idx.tolist() == [[0, 1], [1, 0], [0, 1]]
    new = update_centroids(c, s, idx, 0.5, layout, "toward_mean")
    # a: C0 ← (0,1) + ½((1,2) − (0,1)) = (0.5, 1.5); C1 ← (4,2) + ½((3,1) − (4,2)) = (3.5, 1.5)
    # b: C0 ← (10,0) + ½((10,1) − (10,0)) = (10, 0.5); C1 ← (0,0) + ½((0,1) − (0,0)) = (0, 0.5)
    assert torch.equal(new, flat([(0.5, 1.5), (3.5, 1.5), (100, 100)],
                                 [(10, 0.5), (0, 0.5), (100, 100)]))
    literal = update_centroids(c, s, idx, 0.5, layout, "literal")
    # a: C0 ← (0,1) + ½(1,2) = (0.5, 2); C1 ← (4,2) + ½(3,1) = (5.5, 2.5); b likewise
    assert torch.equal(literal, flat([(0.5, 2), (5.5, 2.5), (100, 100)],
                                     [(15, 0.5), (0, 0.5), (100, 100)]))


def test_per_image_update_by_hand() -> None:
    layout = StatsLayout.build(["a"], [1], gamma=1.0)
    c = flat([(0, 1), (4, 2)])
    s = flat([(1, 1), (3, 1), (1, 3)])
    new = update_centroids_per_image(c, s, 0.5, layout, "toward_mean")
    # s1 → C0 = (0.5, 1); s2: D(C0) = 6.25, D(C1) = 2 → C1 = (3.5, 1.5);
    # s3: D(C0) = 0.0625·4 + 4 = 4.25, D(C1) = 6.25 + 2.25 → C0 = (0.75, 2)
    assert torch.equal(new, flat([(0.75, 2), (3.5, 1.5)]))
    assert torch.equal(c, flat([(0, 1), (4, 2)]))  # inputs are not modified


def test_literal_rule_diverges_toward_mean_converges() -> None:
    layout = StatsLayout.build(["a"], [1], gamma=1.0)
    c = flat([(0.0, 1.0)])
    s = flat([(1.0, 2.0)] * 4)
    lit, tow = c, c
    for lam in lambda_schedule(200, 0.1, 0.001):
        idx = torch.zeros(4, 1, dtype=torch.long)
        lit = update_centroids(lit, s, idx, lam, layout, "literal")
        tow = update_centroids(tow, s, idx, lam, layout, "toward_mean")
    assert lit.norm() > 5 * s[0].norm()  # grows by Σλ_t · |s| ≈ 10·|s|
    assert torch.allclose(tow, s[:1], atol=1e-3)  # settles on the statistics


def test_activation_stats_match_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(3, 3, 8, 8)
    conv_out = model[0](x)
    lin_out = model(x)
    with ActivationStats(model, "layer") as tap, torch.inference_mode():
        s = tap(x)
    assert tap.names == ["0", "3"] and tap.channels == [1, 1]
    var_c, mu_c = torch.var_mean(conv_out.flatten(1), 1, correction=0)
    var_l, mu_l = torch.var_mean(lin_out, 1, correction=0)
    ref = torch.stack([mu_c, mu_l, var_c.sqrt(), var_l.sqrt()], 1)
    assert torch.allclose(s, ref, atol=1e-6)
    with ActivationStats(model, "channel") as tap, torch.inference_mode():
        s = tap(x)
    assert tap.channels == [4, 5]
    var_c, mu_c = torch.var_mean(conv_out, (2, 3), correction=0)
    ref = torch.cat([mu_c, lin_out, var_c.sqrt(), torch.zeros_like(lin_out)], 1)
    assert torch.allclose(s, ref, atol=1e-6)


def test_rank_lowest_highest_and_ties() -> None:
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    assert rank(scores, 3, "lowest").tolist() == [1, 3, 2]
    assert rank(scores, 2, "highest").tolist() == [4, 0]


# ---------------------------------------------------------------- the strategy


def second_pass_scores(ctx, strategy: SelectQ, centroids: torch.Tensor, positions: torch.Tensor,
                       pool: torch.Tensor) -> torch.Tensor:
    """The paper's literal second traversal: forward the pool again (in ``positions`` order)
    with the final centroids fixed, scoring each batch as it comes."""
    cfg = strategy.cfg
    out = torch.empty(len(pool))
    batch_size = cfg.batch_size or ctx.budget.eval_batch_size
    loader = ctx.data.loader(ctx.data.train, batch_size, pool[positions].tolist())
    start = 0
    with ActivationStats(ctx.model, cfg.stats) as tap, torch.inference_mode():
        for images, _ in loader:
            stats = tap(images)
            layout = tap.layout(cfg.gamma)
            out[positions[start:start + len(images)]] = score(stats, centroids, layout)[0]
            start += len(images)
    return out


def test_one_pass_ranks_exactly_as_a_second_traversal(make_ctx) -> None:
    data = tiny_datamodule(n_train=96)
    ctx = make_ctx(random_resnet20(), data, num_samples=12, pool_size=80, eval_batch_size=16)
    strategy = selectq()
    calib = strategy.calibration_set(ctx)
    pool, order = pool_and_order(ctx, 80, True)
    result = strategy.cluster(ctx, pool, order)
    one_pass, _ = score(result.stats, result.centroids, result.layout)
    assert calib.info["indices"] == pool[rank(one_pass, 12, "lowest")].tolist()
    # Same traversal order: bit-identical scores.
    two_pass = second_pass_scores(ctx, strategy, result.centroids, order, pool)
    assert torch.equal(one_pass, two_pass)
    # A second traversal in dataset order: same ranking.
    in_order = second_pass_scores(ctx, strategy, result.centroids, torch.arange(len(pool)), pool)
    assert torch.allclose(one_pass, in_order, rtol=1e-5, atol=0)
    assert torch.equal(rank(one_pass, 12, "lowest"), rank(in_order, 12, "lowest"))
    assert calib.info["scores"] == one_pass[rank(one_pass, 12, "lowest")].tolist()
    # Chunked pool scoring (what calibration_set uses) = one-shot scoring; sizes = assignments.
    chunked, sizes = score_pool(result.stats, result.centroids, result.layout, chunk=7)
    assert torch.equal(chunked, one_pass)
    idx = score(result.stats, result.centroids, result.layout)[1]
    assert sizes.tolist() == [torch.bincount(col, minlength=10).tolist() for col in idx.t()]
    assert calib.info["cluster_sizes"] == sizes.tolist()


def test_lowest_and_highest_are_opposite_ends(make_ctx, tiny_data) -> None:
    ctx = make_ctx(random_resnet20(), tiny_data, num_samples=10)
    low = selectq(select="lowest").calibration_set(ctx).info
    high = selectq(select="highest").calibration_set(ctx).info
    assert not set(low["indices"]) & set(high["indices"])
    assert low["scores"] == sorted(low["scores"])
    assert high["scores"] == sorted(high["scores"], reverse=True)
    assert max(low["scores"]) < min(high["scores"])
    q = low["pool_score_quantiles"]
    assert low["scores"][0] == q["0"] and high["scores"][0] == q["1"]


def test_deterministic_for_a_seed(make_ctx, tiny_data) -> None:
    model = random_resnet20()
    a = selectq().calibration_set(make_ctx(model, tiny_data, num_samples=8, seed=3))
    b = selectq().calibration_set(make_ctx(model, tiny_data, num_samples=8, seed=3))
    assert a.info["indices"] == b.info["indices"] and a.info["scores"] == b.info["scores"]
    assert torch.equal(a.images, b.images)
    c = selectq().calibration_set(make_ctx(model, tiny_data, num_samples=8, seed=4))
    assert c.info["centroid_norm"]["init"] != a.info["centroid_norm"]["init"]


def test_pool_smaller_than_num_samples_names_the_numbers(make_ctx, tiny_data) -> None:
    ctx = make_ctx(random_resnet20(), tiny_data, num_samples=30)
    with pytest.raises(ConfigError, match=r"num_samples=30 .*\(20 images in the SelectQ pool "
                                          r"\(pool_size=20\)\).*num_samples <= 20"):
        selectq(pool_size=20).calibration_set(ctx)


def test_info_is_complete_and_json(make_ctx, tiny_data) -> None:
    model = random_resnet20()
    model.train()  # the strategy must evaluate in eval mode and leave BN statistics untouched
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    ctx = make_ctx(model, tiny_data, num_samples=8, pool_size=None, eval_batch_size=10)
    info = selectq(num_centroids=4).calibration_set(ctx).info
    assert model.training
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))
    json.dumps(info)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert info["pool_size"] == info["images_seen"] == 64 and info["num_layers"] == n_layers == 22
    assert len(info["cluster_sizes"]) == n_layers
    assert all(len(row) == 4 and sum(row) == 64 for row in info["cluster_sizes"])
    assert len(info["centroids"]) == n_layers
    assert all(len(c["mu"]) == len(c["sigma"]) == 4 for c in info["centroids"])
    assert len(info["centroid_shift"]) == info["lambda"]["num_batches"] == 7  # ceil(64 / 10)
    assert info["lambda"]["first"] == pytest.approx(0.1) and info["lambda"]["last"] == pytest.approx(0.001)
    assert sum(info["class_counts"]) == 8


def test_literal_rule_grows_the_centroid_norm(make_ctx, tiny_data) -> None:
    ctx = make_ctx(random_resnet20(), tiny_data, num_samples=8, eval_batch_size=4)
    lit = selectq(update_rule="literal").calibration_set(ctx).info
    tow = selectq(update_rule="toward_mean").calibration_set(ctx).info
    assert lit["centroid_norm"]["init"] == tow["centroid_norm"]["init"]
    assert lit["centroid_norm"]["final"] > 1.05 * lit["centroid_norm"]["init"]
    assert lit["centroid_norm"]["final"] > tow["centroid_norm"]["final"]
    assert sum(lit["centroid_shift"]) > sum(tow["centroid_shift"])


def test_pool_subset_and_traversal_order(make_ctx, tiny_data) -> None:
    ctx = make_ctx(nn.Linear(1, 1), tiny_data)
    pool, order = pool_and_order(ctx, 20, shuffle=False)
    assert len(pool) == 20 and pool.tolist() == sorted(set(pool.tolist()))
    assert order.tolist() == list(range(20))
    same, shuffled = pool_and_order(ctx, 20, shuffle=True)
    assert torch.equal(same, pool) and sorted(shuffled.tolist()) == list(range(20))
    assert shuffled.tolist() != list(range(20))
    assert pool_and_order(ctx, None, False)[0].tolist() == list(range(64))


def _mobilenet(name: str) -> nn.Module:
    from pytorchcv.model_provider import get_model

    model = get_model(name, pretrained=False)
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)  # zoo models pool 7×7; inputs here are 64×64
    return model.eval()


@pytest.mark.parametrize("arch,size,stats", [
    ("resnet20_cifar10", 32, "channel"),
    ("mobilenetv2_w1", 64, "layer"),
    ("mobilenetv3_large_w1", 64, "layer"),
    ("mobilenetv3_large_w1", 64, "channel"),  # SE convs have 1×1 outputs: σ = 0, not NaN
])
def test_architectures(make_ctx, arch: str, size: int, stats: str) -> None:
    model = random_resnet20() if arch.startswith("resnet") else _mobilenet(arch)
    data = tiny_datamodule(n_train=24, size=size)
    ctx = make_ctx(model, data, num_samples=5, pool_size=None, eval_batch_size=8)
    calib = selectq(stats=stats, update_mode="per_image").calibration_set(ctx)
    info = calib.info
    assert calib.images.shape == (5, 3, size, size) and calib.labels is not None
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert info["num_layers"] == n_layers
    assert all(math.isfinite(s) for s in info["scores"]) and len(set(info["indices"])) == 5
    assert all(sum(row) == 24 for row in info["cluster_sizes"])
    json.dumps(info)


def test_config_yaml_matches_schema(compose) -> None:
    cfg = compose("strategy=selectq")
    assert OmegaConf.to_container(cfg.strategy) == asdict(SelectQConfig())
    assert isinstance(build(cfg.strategy), SelectQ)
    validate(cfg.strategy)
    with pytest.raises(ConfigError, match="valid choices: lowest, highest"):
        validate(SelectQConfig(select="middle"))
    with pytest.raises(ConfigError, match="num_centroids=0"):
        validate(SelectQConfig(num_centroids=0))


@pytest.mark.skipif(not CIFAR_DIR.is_dir(), reason=f"offline data not found at {CIFAR_DIR}")
def test_real_cifar_images_and_labels(cifar, resnet20, make_ctx) -> None:  # noqa: F811
    ctx = make_ctx(resnet20, cifar, num_samples=16, pool_size=200, eval_batch_size=100)
    calib = selectq().calibration_set(ctx)
    indices = calib.info["indices"]
    assert calib.info["pool_size"] == 200 and len(set(indices)) == 16
    images, labels = cifar.load(indices)
    assert torch.equal(calib.images, images) and torch.equal(calib.labels, labels)
    targets = cifar.targets("train")
    assert calib.labels.tolist() == [targets[i] for i in indices]
    assert calib.images.shape == (16, 3, 32, 32)
    assert calib.info["scores"] == sorted(calib.info["scores"])
