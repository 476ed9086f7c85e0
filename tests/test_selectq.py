"""SelectQ: the clustering maths on hand-made numbers (per-image updates against a literal loop,
the init residual), the one-pass design against a literal second traversal, independence of the
forward batch, the pool (head of the shared pool order, outside the validation split), resolved
config, and end-to-end selection on three architectures and on real CIFAR-10."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from conftest import SHARED, TensorImages, tiny_datamodule
from omegaconf import OmegaConf
from torch import nn

from calibbench.config import ConfigError
from calibbench.strategies import build
from calibbench.strategies.random import RandomConfig
from calibbench.strategies.selectq import (
    ActivationStats,
    SelectQ,
    SelectQConfig,
    pool_and_order,
    residual_summary,
    validate,
)
from calibbench.strategies.selectq_clustering import (
    CentroidUpdater,
    StatsLayout,
    knowledge_distance,
    lambda_schedule,
    rank,
    score,
    score_pool,
    update_centroids,
)

CIFAR_DIR = SHARED / "data" / "cifar10-jpeg"



def random_resnet20() -> nn.Module:
    from pytorchcv.model_provider import get_model

    return get_model("resnet20_cifar10", pretrained=False).eval()


def selectq(**fields) -> SelectQ:  # noqa: ANN003
    return build(SelectQConfig(**fields))  # type: ignore[return-value]


def flat(*layers: list[tuple[float, float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Layer-mode stats/centroids in the flat layout: rows are images/centroids,
    columns [μ of each layer…, σ of each layer…]; ``layers[l][row] = (μ, σ)``."""
    rows = len(layers[0])
    mu = [[layers[i][r][0] for i in range(len(layers))] for r in range(rows)]
    sigma = [[layers[i][r][1] for i in range(len(layers))] for r in range(rows)]
    return torch.tensor([m + s for m, s in zip(mu, sigma)], dtype=dtype)


# ---------------------------------------------------------------- maths by hand


def test_lambda_schedule_endpoints_and_monotone_decrease() -> None:
    lam = lambda_schedule(40, 0.1, 0.001)
    assert len(lam) == 40
    assert lam[0] == pytest.approx(0.1, rel=1e-12)
    assert lam[-1] == pytest.approx(0.001, rel=1e-12)
    assert all(a > b for a, b in zip(lam, lam[1:]))
    assert lam[20] == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi * 20 / 39)))
    assert lambda_schedule(1, 0.1, 0.001) == [0.1]  # one step: t / t_max := 0
    # The text's t_max = number of steps: the last step stays above λ_min.
    text = lambda_schedule(4, 0.1, 0.001, "num_steps")
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


def literal_per_image_loop(centroids: list[list[tuple[float, float]]],
                           images: list[list[tuple[float, float]]], lambdas: list[float],
                           gamma: float = 1.0) -> list[list[tuple[float, float]]]:
    """The paper's reading in plain Python: image by image, in every layer the nearest centroid
    (lowest index on ties) moves by λ_t toward the image's (μ, σ). ``centroids[l][k]``,
    ``images[i][l]`` are (μ, σ) pairs; returns the final centroids."""
    cents = [[list(c) for c in layer] for layer in centroids]
    for image, lam in zip(images, lambdas):
        for j, (mu, sigma) in enumerate(image):
            d = [(c[0] - mu) ** 2 + gamma * (c[1] - sigma) ** 2 for c in cents[j]]
            k = d.index(min(d))
            cents[j][k] = [cents[j][k][0] + lam * (mu - cents[j][k][0]),
                           cents[j][k][1] + lam * (sigma - cents[j][k][1])]
    return [[tuple(c) for c in layer] for layer in cents]


def test_update_batch_size_one_is_the_literal_per_image_loop() -> None:
    layout = StatsLayout.build(["a", "b"], [1, 1], gamma=0.5)
    cents = [[(0.0, 1.0), (4.0, 2.0), (9.0, 9.0)], [(10.0, 0.0), (0.0, 0.0), (-3.0, 5.0)]]
    images = [[(1.0, 1.0), (0.0, 0.0)], [(3.0, 1.0), (10.0, 1.0)], [(1.0, 3.0), (0.0, 2.0)],
              [(8.0, 7.5), (-2.0, 4.0)], [(2.0, 1.5), (5.0, 0.5)], [(3.5, 2.5), (9.0, 0.0)],
              [(0.5, 0.5), (1.0, 1.0)]]
    lambdas = lambda_schedule(len(images), 0.3, 0.01)
    expected = literal_per_image_loop(cents, images, lambdas, gamma=0.5)
    f64 = torch.float64  # the loop above runs in Python floats (doubles)
    init = flat(*cents, dtype=f64)
    stats = torch.stack([flat(*[[pair] for pair in image], dtype=f64)[0] for image in images])
    for chunks in ([7], [3, 4], [1] * 7, [2, 2, 2, 1]):  # forward batches of any size
        up = CentroidUpdater(init, layout, len(images), 1, 0.3, 0.01)
        start = 0
        for n in chunks:
            up.feed(stats[start:start + n])
            start += n
        final = up.finish()
        assert up.lambdas == lambdas and up.num_steps == 7
        assert torch.equal(final, flat(*expected, dtype=f64)), chunks  # the same operations
    assert torch.equal(init, flat(*cents, dtype=f64))  # inputs are not modified


def test_update_chunks_do_not_depend_on_how_rows_arrive() -> None:
    torch.manual_seed(0)
    layout = StatsLayout.build(["a", "b", "c"], [1, 2, 1], gamma=1.0)
    stats = torch.randn(23, 8)
    init = torch.randn(4, 8) * 2
    results = []
    for feeds in ([23], [5, 2, 16], [1] * 23, [10, 10, 3]):
        up = CentroidUpdater(init, layout, 23, 5, 0.1, 0.001)
        start = 0
        for n in feeds:
            up.feed(stats[start:start + n])
            start += n
        results.append((up.finish(), up.residual, up.moves, up.shifts))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        assert torch.equal(results[0][2], other[2]) and results[0][3] == other[3]
    # 23 images at 5 per step: 5 steps, the last of 3 images; by hand with update_centroids.
    lambdas = lambda_schedule(5, 0.1, 0.001)
    c = init
    for t, start in enumerate(range(0, 23, 5)):
        chunk = stats[start:start + 5]
        c = update_centroids(c, chunk, knowledge_distance(chunk, c, layout).argmin(1), lambdas[t], layout)
    assert torch.equal(results[0][0], c)
    with pytest.raises(ConfigError, match=r"strategy.update_batch_size=0 must be >= 1"):
        validate(SelectQConfig(update_batch_size=0))
    with pytest.raises(ConfigError, match=r"update_batch_size=-3"):
        selectq(update_batch_size=-3).calibration_set(None)  # type: ignore[arg-type]


def test_init_residual_by_hand() -> None:
    layout = StatsLayout.build(["a"], [1], gamma=1.0)
    # C0 near the images 1 and 3, C1 near image 2, C2 far away: it never moves.
    init = flat([(0.0, 0.0), (10.0, 0.0), (100.0, 100.0)])
    stats = flat([(1.0, 0.0), (9.0, 0.0), (2.0, 0.0)])
    up = CentroidUpdater(init, layout, 3, 1, 0.1, 0.001)
    up.feed(stats)
    final = up.finish()
    lam = lambda_schedule(3, 0.1, 0.001)  # [0.1, 0.0505, 0.001]
    assert up.residual[:, 0].tolist() == pytest.approx([(1 - lam[0]) * (1 - lam[2]), 1 - lam[1], 1.0],
                                                       rel=1e-12)
    assert up.moves[:, 0].tolist() == [2, 1, 0]
    # What the residual means: shifting a centroid's start by δ shifts its end by residual·δ
    # (the assignments being the same).
    shifted = init.clone()
    shifted[0, 0] += 0.25
    up2 = CentroidUpdater(shifted, layout, 3, 1, 0.1, 0.001)
    up2.feed(stats)
    assert float(up2.finish()[0, 0] - final[0, 0]) == pytest.approx(0.25 * float(up.residual[0, 0]),
                                                                     rel=1e-5)
    sizes = torch.tensor([[2, 1, 0]])  # (L, K) final cluster sizes
    summary = residual_summary(up.residual, up.moves, sizes, ["a"], "toward_mean")
    r0, r1 = (1 - lam[0]) * (1 - lam[2]), 1 - lam[1]
    layer = summary["per_layer"][0]
    assert layer["max_moved"] == pytest.approx(r1) and layer["mean_moved"] == pytest.approx((r0 + r1) / 2)
    assert layer["weighted"] == pytest.approx((2 * r0 + r1) / 3) and layer["never_moved"] == 1
    assert summary["weighted"] == pytest.approx((2 * r0 + r1) / 3) and summary["never_moved"] == 1
    assert summary["per_centroid"] == [pytest.approx([r0, r1, 1.0])]
    # The literal rule adds to the start, which keeps weight 1.
    lit = CentroidUpdater(init, layout, 3, 1, 0.1, 0.001, rule="literal")
    lit.feed(stats)
    lit.finish()
    assert lit.residual.tolist() == [[1.0], [1.0], [1.0]] and lit.moves[:, 0].tolist() == [2, 1, 0]


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
    # Per-image updates by default: one step per pool image, whatever the forward batch (10).
    assert info["update_batch_size"] == 1 and info["update_steps"] == info["lambda"]["num_steps"] == 64
    assert len(info["centroid_shift"]) == info["centroid_shift_windows"] == 50  # min(50, steps)
    assert info["lambda"]["first"] == pytest.approx(0.1) and info["lambda"]["last"] == pytest.approx(0.001)
    assert sum(info["class_counts"]) == 8
    res = info["init_residual"]
    assert len(res["per_layer"]) == len(res["per_centroid"]) == n_layers
    assert all(len(row) == 4 and all(0 <= v <= 1 for v in row) for row in res["per_centroid"])
    assert res["centroids"] == 4 * n_layers and 0 <= res["never_moved"] < res["centroids"]
    assert 0 <= res["weighted"] <= 1 and res["weighted"] == max(p["weighted"] for p in res["per_layer"])
    moves = info["centroid_moves"]  # (L, K): every step moves exactly one centroid per layer
    assert all(sum(row) == 64 for row in moves)
    assert all((m == 0) == (r == 1.0) for mr, rr in zip(moves, res["per_centroid"]) for m, r in zip(mr, rr))


def test_literal_rule_grows_the_centroid_norm(make_ctx, tiny_data) -> None:
    ctx = make_ctx(random_resnet20(), tiny_data, num_samples=8, eval_batch_size=4)
    lit = selectq(update_rule="literal").calibration_set(ctx).info
    tow = selectq(update_rule="toward_mean").calibration_set(ctx).info
    assert lit["centroid_norm"]["init"] == tow["centroid_norm"]["init"]
    assert lit["centroid_norm"]["final"] > 1.05 * lit["centroid_norm"]["init"]
    assert lit["centroid_norm"]["final"] > tow["centroid_norm"]["final"]
    assert sum(lit["centroid_shift"]) > sum(tow["centroid_shift"])


def held_out_datamodule(n_train: int = 64, holdout: tuple[int, ...] = (0, 3, 7, 12, 30, 31, 50, 63)):
    """tiny_datamodule's images with a validation split held out of the calibration pool."""
    from calibbench.datasets import DataModule

    tiny = tiny_datamodule(n_train=n_train)
    train = TensorImages(tiny.train.images, torch.tensor(tiny.train.targets))
    return DataModule("tiny_holdout", train, tiny.test, tiny.num_classes, tiny.input_size, tiny.mean,
                      tiny.std, num_workers=0, holdout=list(holdout))


def test_pool_subset_and_traversal_order(make_ctx) -> None:
    data = held_out_datamodule()
    ctx = make_ctx(nn.Linear(1, 1), data, seed=5)
    assert len(data.pool) == 56
    pool, order = pool_and_order(ctx, 20, shuffle=False)
    # The head of the shared pool order, sorted: never a validation image.
    assert pool.tolist() == sorted(ctx.pool_permutation()[:20].tolist())
    assert set(pool.tolist()) <= set(data.pool.tolist()) and not set(pool.tolist()) & set(data.holdout)
    assert order.tolist() == list(range(20))
    same, shuffled = pool_and_order(ctx, 20, shuffle=True)
    assert torch.equal(same, pool) and sorted(shuffled.tolist()) == list(range(20))
    assert shuffled.tolist() != list(range(20))
    for size in (None, 56, 1000):  # the whole pool, in index order
        assert torch.equal(pool_and_order(ctx, size, False)[0], data.pool)
    # random at the same seed draws the head of the same order: a uniform sample of this pool.
    rnd = build(RandomConfig(name="random")).calibration_set(
        make_ctx(nn.Linear(1, 1), data, num_samples=12, seed=5)).info
    assert set(rnd["indices"]) <= set(pool.tolist())
    # The strategy end to end selects inside its pool.
    info = selectq(pool_size=20).calibration_set(
        make_ctx(random_resnet20(), data, num_samples=6, seed=5, eval_batch_size=8)).info
    assert info["pool_size"] == 20 and set(info["indices"]) <= set(pool.tolist())


def test_resolved_config_resolves_every_fallback(make_ctx, tiny_data) -> None:
    model = nn.Linear(1, 1)
    ctx = make_ctx(model, tiny_data, pool_size=None, eval_batch_size=32)
    resolved = selectq().resolved_config(ctx)
    assert resolved["pool_size"] == 64 and resolved["batch_size"] == 32  # whole pool, budget batch
    assert {k: v for k, v in resolved.items() if k not in ("pool_size", "batch_size")} == \
        {k: v for k, v in asdict(SelectQConfig()).items() if k not in ("pool_size", "batch_size")}
    assert selectq().resolved_config(make_ctx(model, tiny_data, pool_size=20))["pool_size"] == 20
    assert selectq(pool_size=30).resolved_config(make_ctx(model, tiny_data, pool_size=20))["pool_size"] == 30
    # A pool_size beyond the pool is the whole pool: the same run as null, the same key.
    assert selectq(pool_size=1000).resolved_config(ctx) == selectq().resolved_config(ctx)
    assert selectq(batch_size=7).resolved_config(ctx)["batch_size"] == 7
    held_out = make_ctx(model, held_out_datamodule(), pool_size=None)
    assert selectq().resolved_config(held_out)["pool_size"] == 56  # the pool, not the train split


def test_forward_batch_is_speed_only(make_ctx) -> None:
    """Any forward batch gives bit-identical centroids, scores and selection (a batch of one is run
    padded to two, since CPU convolutions take another kernel for a single image)."""
    model = random_resnet20()
    data = tiny_datamodule(n_train=40)
    infos = [selectq(batch_size=bs, update_batch_size=3).calibration_set(
                 make_ctx(model, data, num_samples=8, pool_size=None)).info
             for bs in (1, 7, 16, 40)]
    for key in ("indices", "scores", "centroids", "init_residual", "cluster_sizes", "centroid_shift"):
        assert all(info[key] == infos[0][key] for info in infos[1:]), key


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
    calib = selectq(stats=stats, update_batch_size=3).calibration_set(ctx)
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
    with pytest.raises(ConfigError, match="strategy.update_batch_size=0"):
        validate(compose("strategy=selectq", "strategy.update_batch_size=0").strategy)
    with pytest.raises(ConfigError, match="valid choices: last_step, num_steps"):
        validate(SelectQConfig(anneal_t_max="last_batch"))


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


@pytest.mark.parametrize("size", [1, 3])
def test_corrupt_rows_keep_their_step_and_move_nothing(size) -> None:
    """A corrupt file (``keep`` False) holds its traversal position: every other image keeps the
    λ_t of its position, the schedule still has all its steps, and the skipped row never moves a
    centroid (its statistics are NaN in the pass)."""
    torch.manual_seed(1)
    layout = StatsLayout.build(["a", "b"], [1, 1], gamma=1.0)
    stats, init = torch.randn(10, 4), torch.randn(3, 4)
    keep = torch.ones(10, dtype=torch.bool)
    keep[[0, 4, 5]] = False
    stats[~keep] = float("nan")
    for feeds in ([10], [4, 6], [1] * 10):
        up = CentroidUpdater(init, layout, 10, size, 0.1, 0.001)
        start = 0
        for n in feeds:
            up.feed(stats[start:start + n], keep[start:start + n])
            start += n
        final = up.finish()
        assert (up.step, up.seen, up.skipped) == (math.ceil(10 / size), 7, 3)
        c = init
        for t, begin in enumerate(range(0, 10, size)):
            rows = stats[begin:begin + size][keep[begin:begin + size]]
            if len(rows):
                c = update_centroids(c, rows, knowledge_distance(rows, c, layout).argmin(1), up.lambdas[t], layout)
        assert torch.isfinite(final).all() and torch.equal(final, c), feeds
