"""Fake-quant package: grid arithmetic, observers, module placement per preset, calibration."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from calibbench.config import ConfigError, QuantConfig
from calibbench.quant import (
    QuantAct,
    QuantConv2d,
    QuantLinear,
    UniformQuantizer,
    build_observer,
    calibrate,
    calibration_mode,
    describe,
    fold_bn,
    quantize,
    quantizers,
)

DFQ = QuantConfig(name="dfq_legacy")
ACADEMIC = QuantConfig(name="academic", act_placement="layer_input", fold_bn=True,
                       first_last_bits=8, quantize_input=True)


def resnet20_random() -> nn.Module:
    """Architecture only (no download), with non-trivial BN statistics so folding matters."""
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    model = get_model("resnet20_cifar10", pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def count(model: nn.Module, cls: type) -> int:
    return sum(1 for m in model.modules() if type(m) is cls)


def quantizer(bits: int, lo: float, hi: float, symmetric: bool = False,
              include_zero: bool = True) -> UniformQuantizer:
    q = UniformQuantizer(bits, symmetric=symmetric, include_zero=include_zero)
    q.set_range(torch.tensor([lo]), torch.tensor([hi]))
    return q


# -- grid arithmetic by hand ---------------------------------------------------------------------
def test_asymmetric_2bit_by_hand() -> None:
    # range [-1, 2], 2 bits: scale (2 - -1)/3 = 1, zero point 1, levels -1, 0, 1, 2.
    q = quantizer(2, -1.0, 2.0)
    assert q.scale.item() == 1.0 and q.zero_point.item() == 1
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.5, 3.0])
    # round-half-even: -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; clamp to [-1, 2]
    expected = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0])
    assert torch.equal(q(x), expected)


def test_asymmetric_3bit_by_hand() -> None:
    # range [0, 3.5], 3 bits: scale 0.5, zero point 0, levels 0, 0.5, ..., 3.5
    q = quantizer(3, 0.0, 3.5)
    assert q.scale.item() == 0.5 and q.zero_point.item() == 0
    x = torch.tensor([-1.0, 0.2, 0.25, 0.75, 1.3, 3.4, 5.0])
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.5, 3.5, 3.5])  # 0.25/0.5 = 0.5 -> 0 (even)
    assert torch.equal(q(x), expected)


def test_dfq_weight_grid_does_not_force_zero() -> None:
    # ZeroQ's weight grid: raw range [1, 4] at 2 bits -> scale 1, levels 1..4; 0 is not a level
    q = quantizer(2, 1.0, 4.0, include_zero=False)
    assert q.scale.item() == 1.0 and q.zero_point.item() == -1
    assert torch.equal(q(torch.tensor([0.0, 1.4, 2.5, 5.0])), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    lo, hi = q.range()
    assert (lo.item(), hi.item()) == (1.0, 4.0)
    # with zero forced in (academic, activations): [0, 4] -> scale 4/3 and 0 exact
    qz = quantizer(2, 1.0, 4.0, include_zero=True)
    assert qz.scale.item() == pytest.approx(4 / 3) and qz.zero_point.item() == 0
    assert qz(torch.tensor([0.0])).item() == 0.0


def test_symmetric_grid_is_centred() -> None:
    # 3 bits symmetric over [-3, 1.5]: scale 3/3 = 1, codes -3..3 (the -4 code stays unused)
    q = quantizer(3, -3.0, 1.5, symmetric=True)
    assert q.scale.item() == 1.0 and q.zero_point.item() == 0
    x = torch.linspace(-5, 5, 101)
    assert torch.equal(q(x), -q(-x))  # odd function: the grid is centred on 0
    assert set(q(x).tolist()) == {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}


def test_constant_channel_is_exact() -> None:
    q = UniformQuantizer(4, ch_axis=0, include_zero=False, num_channels=2)
    q.set_range(torch.tensor([0.7, -2.0]), torch.tensor([0.7, 3.0]))
    w = torch.tensor([[0.7, 0.7], [-2.0, 3.0]])
    assert torch.isfinite(q.scale).all()
    assert torch.allclose(q(w), w)


# -- invariants ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_levels_and_error_bound(bits: int, symmetric: bool) -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(bits))
    q = quantizer(bits, x.min().item(), x.max().item(), symmetric=symmetric)
    y = q(x)
    assert y.unique().numel() <= 2**bits
    assert (x - y).abs().max().item() <= q.scale.item() / 2 * (1 + 1e-5)


def test_per_channel_ranges_differ() -> None:
    base = torch.randn(1, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w = base * torch.tensor([0.1, 1.0, 5.0, 20.0]).view(4, 1, 1, 1)  # same shape, 4 magnitudes
    obs = build_observer("minmax", 4, ch_axis=0, include_zero=False, valid=("minmax",))
    q = UniformQuantizer(4, ch_axis=0, include_zero=False, observer=obs, num_channels=4)
    obs(w)
    q.load_observer_qparams()
    assert torch.all(q.scale[1:] > q.scale[:-1] * 3)
    lo, hi = q.range()  # integral zero point: the grid ends lie within scale/2 of min/max
    assert ((lo - w.amin(dim=(1, 2, 3))).abs() <= q.scale / 2 + 1e-6).all()
    assert ((hi - w.amax(dim=(1, 2, 3))).abs() <= q.scale / 2 + 1e-6).all()
    assert torch.allclose(hi - lo, 15 * q.scale)
    assert ((w - q(w)).abs() <= q.scale.view(4, 1, 1, 1) / 2 + 1e-6).all()


def test_ste_gradient() -> None:
    q = quantizer(4, -1.0, 1.0)
    x = torch.tensor([-3.0, -0.9, -0.2, 0.0, 0.33, 0.99, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


# -- observers -----------------------------------------------------------------------------------
def _batches(dist: torch.distributions.Distribution, n: int = 4, size: int = 50_000) -> list:
    torch.manual_seed(0)
    return [dist.sample((size,)) for _ in range(n)]


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse", "aciq"])
def test_observers_on_laplace(name: str) -> None:
    batches = _batches(torch.distributions.Laplace(0.0, 1.0))
    obs = build_observer(name, 4)
    for b in batches:
        obs(b)
    lo, hi = (t.item() for t in obs.calculate_range())
    data_min = min(b.min().item() for b in batches)
    data_max = max(b.max().item() for b in batches)
    assert data_min <= lo < -1.0 and 1.0 < hi <= data_max  # finite, inside the data, not collapsed
    if name == "minmax":
        assert (lo, hi) == (data_min, data_max)
    if name == "percentile":  # Laplace(0, 1) 99.99th percentile: ln(1 / (2 * 1e-4)) = 8.52
        assert hi == pytest.approx(8.52, rel=0.1) and lo == pytest.approx(-8.52, rel=0.1)
    if name == "aciq":  # b = 1: alpha = 5.03 at 4 bits
        assert hi == pytest.approx(5.03, rel=0.05) and lo == pytest.approx(-5.03, rel=0.05)
    if name == "mse":  # clipping beats min/max for a heavy-tailed distribution at 4 bits
        assert hi < 0.9 * data_max
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and scale.item() > 0


def test_aciq_one_sided_after_relu() -> None:
    batches = [b.relu() for b in _batches(torch.distributions.Laplace(0.0, 1.0))]
    obs = build_observer("aciq", 4)
    for b in batches:
        obs(b)
    lo, hi = (t.item() for t in obs.calculate_range())
    assert lo == 0.0 and 1.0 < hi < max(b.max().item() for b in batches)
    assert build_observer("aciq", 12).batch_range(batches[0][None])[1].item() == batches[0].max().item()


def test_unknown_observer_names_choices() -> None:
    with pytest.raises(ConfigError, match="kl.*minmax, ema, percentile, mse, aciq"):
        build_observer("kl", 4)
    with pytest.raises(ConfigError, match="weight_observer.*minmax, mse"):
        quantize(nn.Linear(2, 2), QuantConfig(name="dfq_legacy", weight_observer="aciq"), 4, 4)
    with pytest.raises(ConfigError, match="act_observer"):
        quantize(nn.Linear(2, 2), QuantConfig(name="dfq_legacy", act_observer="histogram"), 4, 4)


# -- presets on resnet20 -------------------------------------------------------------------------
def test_dfq_legacy_placement() -> None:
    fp = resnet20_random()
    n_conv, n_lin, n_relu = count(fp, nn.Conv2d), count(fp, nn.Linear), count(fp, nn.ReLU)
    assert (n_conv, n_lin, n_relu) == (21, 1, 19)  # incl. the two 1x1 shortcut convs
    q = quantize(fp, DFQ, 4, 4)
    info = describe(q)
    json.dumps(info)
    assert info["preset"] == "dfq_legacy" and (info["w_bits"], info["a_bits"]) == (4, 4)
    assert info["num_weight_quantizers"] == n_conv + n_lin == 22
    assert info["num_act_quantizers"] == n_relu == 19
    kinds = [row[1] for row in info["quantizers"]]
    assert "input" not in kinds  # image input (and layer inputs) not quantized
    assert {r[2] for r in info["quantizers"]} == {4}
    assert count(q, nn.BatchNorm2d) == 21  # BN not folded
    assert count(q, QuantConv2d) == 21 and count(q, QuantLinear) == 1 and count(q, QuantAct) == 19
    assert all(isinstance(m.act, nn.ReLU) for m in q.modules() if isinstance(m, QuantAct))
    wq = q.features.init_block.conv.weight_quantizer
    assert wq.ch_axis == 0 and wq.scale.numel() == 16 and not wq.symmetric and not wq.include_zero


def test_academic_placement() -> None:
    q = quantize(resnet20_random(), ACADEMIC, 4, 4)
    info = describe(q)
    assert count(q, nn.BatchNorm2d) == 0 and info["folded_bn"] == 21
    assert info["num_weight_quantizers"] == 22 and info["num_act_quantizers"] == 22
    bits = {path: b for path, _, b in info["quantizers"]}
    first, last = "features.init_block.conv.", "output."
    assert bits[first + "input_quantizer"] == bits[first + "weight_quantizer"] == 8  # the image
    assert bits[last + "input_quantizer"] == bits[last + "weight_quantizer"] == 8
    assert {b for p, b in bits.items() if not p.startswith((first, last))} == {4}
    assert count(q, QuantAct) == 0


def test_activation_module_choice() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.ReLU6(),
                          nn.Conv2d(4, 4, 1), nn.Sigmoid())
    assert describe(quantize(model, DFQ, 4, 4))["num_act_quantizers"] == 2  # gate not quantized
    assert describe(quantize(model, DFQ, 4, 4, act_modules="relu"))["num_act_quantizers"] == 1


def test_shared_activation_module_shares_quantizer() -> None:
    relu = nn.ReLU()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    q = quantize(Twice(), DFQ, 8, 8)
    assert describe(q)["num_act_quantizers"] == 1
    calibrate(q, [torch.randn(4, 3, 8, 8)])
    assert q.relu.quantizer.active


def test_bn_folding_preserves_outputs(resnet20) -> None:  # noqa: ANN001
    folded = copy.deepcopy(resnet20)
    pairs = fold_bn(folded)
    assert len(pairs) == 21 and count(folded, nn.BatchNorm2d) == 0
    assert ("features.init_block.conv", "features.init_block.bn") in pairs
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = resnet20(x), folded(x)
    assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


def test_bn_folding_skips_unconfirmed_pairs() -> None:
    class BnFirst(nn.Module):  # conv registered before bn, but the bn reads the input
        in_size = (8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x))

    assert fold_bn(BnFirst().eval()) == []


# -- quantize / calibrate / freeze ---------------------------------------------------------------
def test_quantize_leaves_fp_model_unchanged() -> None:
    fp = resnet20_random()
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    types = [type(m) for m in fp.modules()]
    q = quantize(fp, ACADEMIC, 4, 4)
    calibrate(q, [torch.randn(2, 3, 32, 32)])
    after = fp.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in fp.modules()] == types


def test_w8a8_close_to_fp_on_random_input() -> None:
    fp = resnet20_random()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for cfg in (DFQ, ACADEMIC):
        q = quantize(fp, cfg, 8, 8)
        calibrate(q, x.split(8))
        with torch.no_grad():
            ref, out = fp(x), q(x)
        assert (out - ref).norm() / ref.norm() < 0.05, cfg.name


def test_freeze_keeps_ranges() -> None:
    q = quantize(resnet20_random(), DFQ, 4, 4)
    calibrate(q, [torch.randn(4, 3, 32, 32)])
    state = {p: (qz.scale.clone(), qz.zero_point.clone()) for p, _, qz in quantizers(q)}
    assert all(qz.active and not qz.observing for _, _, qz in quantizers(q))
    with torch.no_grad():
        q(10 * torch.randn(2, 3, 32, 32))  # much larger activations: must not move the ranges
    q.train()
    q(torch.randn(2, 3, 32, 32))
    for p, _, qz in quantizers(q):
        assert torch.equal(qz.scale, state[p][0]) and torch.equal(qz.zero_point, state[p][1]), p


def test_calibration_mode_context_and_observe_off() -> None:
    fp = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    q = quantize(fp, DFQ, 2, 2)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), calibration_mode(q):
        assert torch.allclose(q(x), fp[1](fp[0](x)), atol=0.5 * fp[0].weight.abs().max().item() * 27)
        act = q[1].quantizer
        assert act.observing and not act.active  # observed, not quantized, during calibration
    assert act.active and not act.observing
    assert q(x).detach().unique().numel() <= 4


def test_frozen_weight_cache_matches_recomputation() -> None:
    q = quantize(resnet20_random(), DFQ, 4, 4)
    conv = q.features.stage2.unit1.body.conv1.conv
    x = torch.randn(2, 16, 32, 32)
    with torch.inference_mode():
        first = conv(x)
        cached = conv._cached_weight
        second = conv(x)
    assert conv._cached_weight is cached and torch.equal(first, second)
    direct = conv.weight_quantizer.fake_quantize(conv.weight.detach())
    assert torch.equal(cached, direct)
    assert torch.equal(first, nn.functional.conv2d(x, direct, None, 2, 1))
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in-place change: version bump -> new range and new cache
        third = conv(x)
    assert conv._cached_weight is not cached
    assert torch.allclose(third, 2 * first, rtol=1e-5, atol=1e-5)


def test_training_mode_trains_through_ste() -> None:
    q = quantize(resnet20_random(), DFQ, 4, 4)
    with torch.inference_mode():  # pitfall 7: calibration under inference_mode must not poison
        calibrate(q, [torch.randn(2, 3, 32, 32)])
    q.train()
    q(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = [m.weight.grad for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert q.features.init_block.conv._cached_weight is None


def test_fused_relu_equals_relu_then_quant() -> None:
    relu = nn.ReLU(inplace=True)
    q = quantize(nn.Sequential(nn.Conv2d(3, 4, 1), relu), DFQ, 3, 3)
    calibrate(q, [torch.randn(4, 3, 8, 8)])
    act = q[1]
    assert act._fusable()
    x = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        expected = act.quantizer.fake_quantize(torch.relu(x))
        assert torch.equal(act(x.clone()), expected)


@pytest.mark.needs_shared
def test_w8a8_real_accuracy(resnet20, cifar) -> None:  # noqa: ANN001
    calib, _ = cifar.load(range(0, 50000, 200), "train")  # 250 real train images
    images, labels = cifar.load(range(0, 10000, 20), "val")  # 500 test images, all classes
    q = quantize(resnet20, DFQ, 8, 8)
    calibrate(q, calib.split(64), "cpu")
    with torch.inference_mode():
        acc_fp = (resnet20(images).argmax(1) == labels).float().mean().item()
        acc_q = (q(images).argmax(1) == labels).float().mean().item()
    assert acc_fp > 0.8 and abs(acc_q - acc_fp) <= 0.01
