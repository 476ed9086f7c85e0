"""Reconstruction refiners (adaround / brecq / qdrop): learned rounding in quant/, unit boundaries
per model, the per-unit loop (loss falls, QDrop's dropping, streaming = caching, determinism),
records through the pipeline, and every bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import run_twice
from torch import nn

from calibbench import quant, refine
from calibbench.config import ConfigError, QuantConfig, validate
from calibbench.quant import QuantConv2d, QuantLinear, quantize
from calibbench.quant.adaround import AdaRound, attach, rectified_sigmoid
from calibbench.quant.switches import quantization_off
from calibbench.refine import recon
from calibbench.refine.capture import capture_output
from calibbench.refine.recon import reconstruct, reconstruct_unit
from calibbench.refine.units import build_units

DFQ = QuantConfig(name="dfq_legacy")
ACADEMIC = QuantConfig(name="academic", act_placement="layer_input", fold_bn=True,
                       first_last_bits=8, quantize_input=True)
SMOKE = ("budget=smoke", "num_samples=16")


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1x1 shortcut, ReLU after the sum: a residual unit."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout))
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Toy(nn.Module):
    """stem (conv-BN-ReLU), two residual units, pooled linear head: a chain of blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      Residual(8, 8), Residual(8, 12), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(12, 10)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Skip(nn.Module):
    """Not a chain: the input skips over the children (the rule cannot split it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + x


def _calibrated(model: nn.Module, cfg: QuantConfig, bits: int, images: torch.Tensor) -> nn.Module:
    qmodel = quantize(model, cfg, bits, bits)
    quant.calibrate(qmodel, images.split(16), "cpu")
    return qmodel


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


# -- learned rounding in quant/ ------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [DFQ, ACADEMIC], ids=["dfq_legacy", "academic"])
def test_soft_rounding_starts_at_the_float_weight(cfg):
    images = torch.randn(32, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), cfg, 3, images)
    for layer in _layers(qmodel):
        w = layer.weight.detach().clone()
        rounding = attach(layer)
        soft = layer.quantized_weight().detach()
        codes = w / rounding.scale
        inside = (codes >= rounding.lo - 1e-4) & (codes <= rounding.hi + 1e-4)
        assert inside.float().mean() > 0.75  # per-channel grids cover all but a channel end
        assert torch.allclose(soft[inside], w[inside], atol=1e-6, rtol=1e-5)
        # dfq_legacy's integer zero point can leave a channel's extreme weight up to half a step
        # outside its grid: clamped there, as round-to-nearest clamps it
        outside = (torch.minimum(codes - rounding.lo, rounding.hi - codes)).clamp(max=0).abs()
        assert float(outside.max()) <= 0.5 + 1e-4
        # per channel: one scale per output channel
        assert rounding.scale.numel() == w.shape[0]


@pytest.mark.parametrize("cfg", [DFQ, ACADEMIC], ids=["dfq_legacy", "academic"])
def test_hard_rounding_is_on_the_grid_within_one_step(cfg):
    images = torch.randn(32, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), cfg, 3, images)
    g = torch.Generator().manual_seed(0)
    for layer in _layers(qmodel):
        w = layer.weight.detach().clone()
        rounding = attach(layer)
        with torch.no_grad():
            rounding.V.copy_(3 * torch.randn(rounding.V.shape, generator=g))  # arbitrary directions
        rounding.harden()
        assert rounding.V is None and rounding.hard
        hard = layer.quantized_weight().detach()
        codes = hard / rounding.scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the integer grid
        assert torch.all(codes.round() >= rounding.lo) and torch.all(codes.round() <= rounding.hi)
        step = rounding.scale.expand_as(w)
        assert torch.all((hard - w).abs() <= step * (1 + 1e-4))
        # both directions occur, and the share of weights away from nearest is reported
        changed, total = rounding.changed()
        assert total == w.numel() and 0 < changed < total
        # disabling the weight quantizer gives the float weight back
        layer.weight_quantizer.enable_quant(False)
        assert torch.equal(layer.quantized_weight(), layer.weight)
        layer.weight_quantizer.enable_quant(True)


def test_hard_rounding_of_untrained_v_is_round_to_nearest():
    images = torch.randn(32, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), DFQ, 4, images)
    layer = _layers(qmodel)[1]
    nearest = layer.quantized_weight().detach().clone()
    rounding = attach(layer)
    rounding.harden()
    assert rounding.changed()[0] == 0
    assert torch.allclose(layer.quantized_weight(), nearest, atol=1e-6)


def test_regulariser_drives_h_to_zero_or_one():
    layer = nn.Linear(16, 8)
    wq = quant.UniformQuantizer(3, ch_axis=0, num_channels=8)
    wq.set_range(layer.weight.detach().amin(1), layer.weight.detach().amax(1))
    rounding = AdaRound(layer.weight, wq)
    undecided = lambda: float(torch.minimum(rounding.h(), 1 - rounding.h()).mean())  # noqa: E731
    before = undecided()
    opt = torch.optim.Adam([rounding.V], lr=0.05)
    for step in range(300):
        beta = 20 - 18 * step / 299
        loss = rounding.regularizer(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0.15
    assert undecided() < 0.02
    assert float(rounding.regularizer(2.0)) < 0.1 * float(AdaRound(layer.weight, wq).regularizer(2.0))


def test_rectified_sigmoid_is_clipped():
    v = torch.tensor([-50.0, 0.0, 50.0])
    assert rectified_sigmoid(v).tolist() == pytest.approx([0.0, 0.5, 1.0])
    # AdaRound eq. 23: h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1
    v = torch.linspace(-6, 6, 121)
    assert torch.allclose(rectified_sigmoid(v), (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1), atol=1e-7)


def test_regulariser_is_adaround_eq_24():
    """f_reg(V) = sum_ij 1 - |2 h(V_ij) - 1|^beta on hand-made V."""
    layer = nn.Linear(4, 2)
    wq = quant.UniformQuantizer(3, ch_axis=0, num_channels=2)
    wq.set_range(layer.weight.detach().amin(1), layer.weight.detach().amax(1))
    rounding = AdaRound(layer.weight, wq)
    with torch.no_grad():
        rounding.V.copy_(torch.tensor([[-9.0, -0.4, 0.0, 0.3], [1.1, 2.5, 9.0, -2.0]]))
    h = (torch.sigmoid(rounding.V.detach()) * 1.2 - 0.1).clamp(0, 1)
    for beta in (20.0, 11.0, 2.0):
        want = float((1 - (2 * h - 1).abs() ** beta).sum())
        assert float(rounding.regularizer(beta).detach()) == pytest.approx(want, rel=1e-6)
    with torch.no_grad():  # undecided (h = 0.5) costs 1 per weight at any beta, decided 0
        rounding.V.zero_()
        assert float(rounding.regularizer(20.0)) == pytest.approx(8.0)
        rounding.V.copy_(torch.tensor([[-9.0, 9.0, -9.0, 9.0], [9.0, 9.0, -9.0, -9.0]]))
        assert float(rounding.regularizer(2.0)) == 0.0


# -- unit boundaries -----------------------------------------------------------------------------
def _arch(name: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "tv_resnet18":
        import torchvision

        return torchvision.models.resnet18().eval(), 224
    from pytorchcv.model_provider import get_model

    return get_model(name, pretrained=False).eval(), 32 if "cifar" in name else 224


EXPECTED = {
    # model: (units, stem paths, head paths, a block with a shortcut, the shortcut layer in it)
    "resnet20_cifar10": (11, ["features.init_block"], ["features.final_pool", "output"],
                         "features.stage2.unit1", "features.stage2.unit1.identity_conv.conv"),
    "resnet56_cifar10": (29, ["features.init_block"], ["features.final_pool", "output"],
                         "features.stage3.unit1", "features.stage3.unit1.identity_conv.conv"),
    "mobilenetv2_w1": (20, ["features.init_block"], ["features.final_pool", "output"],
                       "features.stage2.unit2", None),
    "mobilenetv3_large_w1": (18, ["features.init_block"], ["features.final_pool", "output"],
                             "features.stage2.unit2", None),
    "tv_resnet18": (10, ["conv1", "bn1", "relu", "maxpool"], ["avgpool", "fc"], "layer2.0",
                    "layer2.0.downsample.0"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_block_boundaries(name):
    model, size = _arch(name)
    n, stem, head, block, shortcut = EXPECTED[name]
    units, used = build_units(model, "block", torch.randn(1, 3, size, size))
    assert used == "block" and len(units) == n
    assert units[0].paths == stem and units[0].kind == "stem"
    assert units[-1].paths == head and units[-1].kind == "head"
    assert all(u.kind == "block" and len(u.paths) == 1 for u in units[1:-1])
    # every conv/linear belongs to exactly one unit
    all_layers = [id(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    in_units = [id(m) for u in units for m in u.layers(model)]
    assert sorted(in_units) == sorted(all_layers)
    unit = next(u for u in units if u.paths == [block])
    if shortcut is not None:  # the shortcut is inside its residual unit
        assert any(m is model.get_submodule(shortcut) for m in unit.layers(model))
    else:  # an inverted residual with its skip: expansion, depthwise and projection together
        assert len(unit.layers(model)) >= 3
    # running the units one after the other reproduces the model
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = x
        for u in units:
            y = u.run(u.modules(model), y)
        assert torch.allclose(y.reshape(2, -1), model(x).reshape(2, -1), atol=1e-4)


@pytest.mark.parametrize("cfg", [DFQ, ACADEMIC], ids=["dfq_legacy", "academic"])
def test_block_boundaries_of_the_quantized_model(cfg):
    model, size = _arch("resnet20_cifar10")
    qmodel = _calibrated(model, cfg, 4, torch.randn(16, 3, size, size))
    with torch.no_grad(), quantization_off(qmodel):
        units, used = build_units(qmodel, "block", torch.randn(1, 3, size, size))
    assert used == "block" and [u.paths for u in units] == \
        [u.paths for u in build_units(model, "block", torch.randn(1, 3, size, size))[0]]


def test_a_model_that_is_not_a_chain_falls_back_to_layers(caplog):
    with caplog.at_level(logging.WARNING, logger="calibbench.refine.units"):
        units, used = build_units(Skip().eval(), "block", torch.randn(1, 3, 8, 8))
    assert used == "layer" and [u.paths for u in units] == [["a"], ["b"]]
    assert "layer by layer" in caplog.text


def test_layer_units_follow_execution_order():
    units, used = build_units(Toy().eval(), "layer", torch.randn(1, 3, 8, 8))
    assert used == "layer"
    assert [u.paths[0] for u in units] == ["features.0", "features.3.body.0", "features.3.body.3",
                                           "features.3.shortcut", "features.4.body.0",
                                           "features.4.body.3", "features.4.shortcut", "fc"]


# -- the per-unit loop ---------------------------------------------------------------------------
def _recon_cfg(compose, name: str = "brecq", *overrides: str):
    return compose(f"refine={name}", *overrides).refine


def test_reconstruction_lowers_the_unit_loss(compose, resnet20, cifar):
    from calibbench.datasets import spread_indices

    images, _ = cifar.load(spread_indices(len(cifar.train), 64), "train")
    qmodel = _calibrated(resnet20, DFQ, 3, images)
    cfg = _recon_cfg(compose, "brecq")
    model_units, _ = build_units(qmodel, "block", images[:1])
    qmodel.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for unit in model_units[:3]:  # stem and the first two residual units, each on the one before
        rec = reconstruct_unit(qmodel, unit, images, cfg, 150, 32, torch.device("cpu"), gen, "brecq")
        assert rec["loss_end"] < rec["loss_start"], rec
        assert 0 < rec["changed_share"] < 0.5
        assert rec["cached"] and rec["weights"] == sum(m.weight.numel() for m in unit.layers(qmodel))


def _toy_run(compose, make_ctx, tiny_data, name: str, *overrides: str, seed: int = 0):
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    cfg = _recon_cfg(compose, name, *overrides)
    ctx = make_ctx(Toy(), tiny_data, seed=seed, refine_unit_steps=12, refine_unit_batch_size=8)
    record = reconstruct(qmodel, images, ctx, cfg, name)
    with torch.no_grad():
        out = qmodel(images)
    return record, out, qmodel


def test_drop_prob_changes_the_result_and_seed_fixes_it(compose, make_ctx, tiny_data):
    a, out_a, _ = _toy_run(compose, make_ctx, tiny_data, "qdrop")
    b, out_b, _ = _toy_run(compose, make_ctx, tiny_data, "qdrop")
    c, out_c, _ = _toy_run(compose, make_ctx, tiny_data, "qdrop", "refine.drop_prob=0.0")
    assert torch.equal(out_a, out_b) and a["curve"] == b["curve"]
    assert [u["loss_first_step"] for u in a["units"]] != [u["loss_first_step"] for u in c["units"]]
    assert not torch.equal(out_a, out_c)


def test_streamed_unit_data_gives_the_cached_result(compose, make_ctx, tiny_data):
    cached, out_c, _ = _toy_run(compose, make_ctx, tiny_data, "brecq", "refine.fisher=true")
    streamed, out_s, _ = _toy_run(compose, make_ctx, tiny_data, "brecq", "refine.fisher=true",
                                  "refine.cache_mb=0.000001")
    assert all(u["cached"] for u in cached["units"]) and not any(u["cached"] for u in streamed["units"])
    assert torch.allclose(out_c, out_s, atol=1e-5)
    for u, v in zip(cached["units"], streamed["units"]):
        assert u["changed"] == v["changed"]
        assert u["loss_end"] == pytest.approx(v["loss_end"], rel=1e-4)


def test_layer_granularity_and_records(compose, make_ctx, tiny_data):
    record, _, qmodel = _toy_run(compose, make_ctx, tiny_data, "adaround")
    assert record["granularity"] == "layer" and len(record["units"]) == 8
    assert record["steps"] == 8 * 12 and record["iterations_per_unit"] == 12
    for unit in record["units"]:
        assert set(unit) >= {"unit", "loss_start", "loss_end", "changed_share", "seconds", "weights"}
    assert record["weights"] == sum(u["weights"] for u in record["units"])
    # every layer now rounds by its learned, hard decision
    assert all(m.weight_rounding is not None and m.weight_rounding.hard for m in _layers(qmodel))
    # the model's own parameters get their requires_grad flags back (the run froze them)
    assert all(p.requires_grad for p in qmodel.parameters())


def test_nan_loss_names_the_unit_and_iteration(compose, make_ctx, tiny_data):
    images = torch.randn(16, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    images[3, 0, 0, 0] = float("nan")
    ctx = make_ctx(Toy(), tiny_data, refine_unit_steps=5, refine_unit_batch_size=16)
    with pytest.raises(RuntimeError, match=r"unit 'features.0' \(stem\) at iteration 1 of 5"):
        reconstruct(qmodel, images, ctx, _recon_cfg(compose, "brecq"), "brecq")


# -- through the pipeline ------------------------------------------------------------------------
@pytest.mark.needs_shared
def test_qdrop_through_the_pipeline_is_deterministic(compose, tmp_path):
    a, _ = run_twice(compose, tmp_path, "refine=qdrop", *SMOKE)
    units = a["refine"]["units"]
    assert a["refine"]["name"] == "qdrop" and a["refine"]["granularity"] == "block" and len(units) == 11
    assert a["refine"]["steps"] == 11 * 4 and a["images_seen"] == 16 + 11 * 4 * 8
    assert a["config"]["refine"]["drop_prob"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("refine.drop_prob=1.5", r"refine.drop_prob=1.5 is out of range; valid: a probability in \[0, 1\]"),
    ("refine.drop_prob=-0.1", r"refine.drop_prob=-0.1 is out of range"),
    ("refine.iterations=-1", r"refine.iterations=-1 is out of range"),
    ("budget.refine_unit_steps=-3", r"budget.refine_unit_steps=-3 is out of range"),
    ("refine.round_lambda=-0.01", r"refine.round_lambda=-0.01 must be >= 0"),
    ("refine.granularity=tile", r"unknown refine.granularity 'tile'; valid choices: layer, block"),
    ("refine.beta=[20]", r"refine.beta=\[20.0\] must be \[start, end\]"),
    ("refine.warmup=1.0", r"refine.warmup=1.0 must be in \[0, 1\)"),
    ("refine.bn=train", r"refine.bn='train' is not supported"),
])
def test_bad_inputs_fail_before_any_work(compose, tmp_path, override, message):
    from calibbench.pipeline import run

    cfg = compose("refine=qdrop", *SMOKE, override, f"paths.output_dir={tmp_path}",
                  f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
        refine.validate(cfg)
    with pytest.raises(ConfigError):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # nothing computed


def test_first_last_bits_splits_f8l8_from_f4l4(compose):
    from pytorchcv.model_provider import get_model

    model = get_model("resnet20_cifar10", pretrained=False).eval()
    for flb, edge in ((None, 4), (8, 8)):
        cfg = compose("quant=dfq_legacy", f"quant.first_last_bits={'null' if flb is None else flb}").quant
        bits = [q.bits for _, kind, q in quant.quantizers(quantize(model, cfg, 4, 4)) if kind == "weight"]
        assert bits[0] == bits[-1] == edge and set(bits[1:-1]) == {4}


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_fused_activation_quantizer_has_lsq_gradients(drop):
    from calibbench.quant.drop import FakeQuantDrop

    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(4, 3, 5, 5, generator=g)).requires_grad_(True)
    scale = torch.tensor(0.37, requires_grad=True)
    zp = torch.tensor(3.0, requires_grad=True)
    keep = torch.rand(x.shape, generator=g) < drop if drop > 0 else torch.zeros(x.shape, dtype=torch.bool)
    weight = torch.randn(x.shape, generator=g)
    out = FakeQuantDrop.apply(x, scale, zp, 0.0, 7.0, (~keep).float() if drop > 0 else None)
    gx, gs, gz = torch.autograd.grad((out * weight).sum(), (x, scale, zp))
    # LSQ (Esser et al.) written out: v = x/s; inside the code range round(v) - v for s, 1 for x;
    # clamped: the bound for s, -s for z, 0 for x; elements kept float (QDrop) pass x only
    v = (x / scale).detach()
    r = torch.round(v)
    below, above = r + 3.0 < 0.0, r + 3.0 > 7.0
    inside = ~(below | above)
    ref = torch.where(keep, x.detach(), torch.clamp(r + 3.0, 0.0, 7.0).sub(3.0) * 0.37)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(gx, torch.where(keep | inside, weight, torch.zeros(())))
    e = torch.where(inside, r - v, torch.where(below, torch.tensor(-3.0), torch.tensor(4.0)))
    assert float(gs) == pytest.approx(float((weight * e)[~keep].sum()), rel=1e-4, abs=1e-4)
    assert float(gz) == pytest.approx(float(-0.37 * weight[~keep & ~inside].sum()), rel=1e-4, abs=1e-4)
    assert float((out.detach() != x.detach()).float().mean()) > 0.3  # it does quantize


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 0.3])
def test_bernoulli_mask_is_bernoulli_p_and_seeded(p):
    from calibbench.quant.drop import bernoulli_mask

    like = torch.empty(64, 17, 9, 9)  # an odd element count: the byte path trims its last word
    torch.manual_seed(3)
    a = bernoulli_mask(like, p)
    torch.manual_seed(3)
    b = bernoulli_mask(like, p)
    assert a.shape == like.shape and a.dtype == like.dtype and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    share = float(a.mean())
    assert share == pytest.approx(p, abs=0.01)  # 88k draws: 4 standard deviations is < 0.007
    if 0 < p < 1:  # independent elements: neighbours agree no more often than chance
        same = float((a[..., 1:] == a[..., :-1]).float().mean())
        assert same == pytest.approx(p * p + (1 - p) * (1 - p), abs=0.01)


def test_mix_picks_exactly_and_in_place():
    from calibbench.quant.drop import mix_

    a, b = torch.randn(1000), torch.randn(1000)
    quantized = (torch.arange(1000) % 3 == 0).float()
    want = torch.where(quantized.bool(), a, b)
    out = mix_(a.clone(), b, quantized.clone())
    assert torch.equal(out, want)  # bit for bit: products with 0 and 1 only


# -- issue 21: the references' procedures ---------------------------------------------------------
def _act_quantizers(model: nn.Module) -> list:
    return [q for _, kind, q in quant.quantizers(model) if kind != "weight"]


def test_brecq_is_two_stages_weights_without_activation_quantization(compose, make_ctx, tiny_data,
                                                                     monkeypatch):
    """Stage "weights" runs with every activation quantizer of the model off (the unit's input is
    the weight-only quantized model's), stage "activations" with them on and the rounding fixed."""

    seen: list[tuple[str, bool]] = []
    original = recon.reconstruct_unit

    def spy(model, unit, *args, **kwargs):  # noqa: ANN001, ANN202
        stage = kwargs.get("stage", args[7] if len(args) > 7 else None)
        seen.append((stage.name, any(q.quant_enabled for q in _act_quantizers(model))))
        if stage.name == "activations":  # the rounding is hard already and stays as it is
            assert all(m.weight_rounding is not None and m.weight_rounding.hard for m in _layers(model))
        return original(model, unit, *args, **kwargs)

    monkeypatch.setattr(recon, "reconstruct_unit", spy)
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    ctx = make_ctx(Toy(), tiny_data, refine_unit_steps=6, refine_unit_batch_size=8, refine_act_steps=5,
                   refine_act_lr=0.01)
    record = reconstruct(qmodel, images, ctx, _recon_cfg(compose, "brecq"), "brecq")
    assert [s["name"] for s in record["stages"]] == ["weights", "activations"]
    assert {name for name, on in seen if name == "weights" and on} == set()  # acts off in stage 1
    assert all(on for name, on in seen if name == "activations") and len(seen) == 2 * 4
    assert all(q.quant_enabled for q in _act_quantizers(qmodel))  # on again afterwards
    weights, acts = record["stages"]
    assert weights["iterations"] == 6 and acts["iterations"] == 5 and acts["p"] == 2.4
    assert weights["learns"] == ["rounding"] and acts["learns"] == ["act_steps"]
    assert set(weights) >= {"name", "iterations", "seconds", "loss_first", "loss_last"}
    assert any(v[0] != v[1] for v in record["act_steps"].values())  # stage 2 moved the steps


def test_one_stage_refiners_record_one_stage(compose, make_ctx, tiny_data):
    record, _, _ = _toy_run(compose, make_ctx, tiny_data, "qdrop")
    assert [s["name"] for s in record["stages"]] == ["weights"]
    assert record["stages"][0]["learns"] == ["rounding", "act_steps"] and record["stages"][0]["p"] == 2.0


def test_learned_steps_move_at_the_cpu_budget_lr(compose, make_ctx, tiny_data):
    """At budget=cpu's act lr the learned steps really move (the old range ends at 4e-5 did not)."""
    lr = compose("refine=qdrop", "budget=cpu").refine.act_lr
    assert lr >= 1e-3
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    cfg = _recon_cfg(compose, "qdrop", f"refine.act_lr={lr}", "refine.init=calibrated")
    ctx = make_ctx(Toy(), tiny_data, refine_unit_steps=60, refine_unit_batch_size=8)
    record = reconstruct(qmodel, images, ctx, cfg, "qdrop")
    moves = sorted(abs(b - a) / a for a, b in record["act_steps"].values())
    assert moves[len(moves) // 2] > 0.01, moves  # the median step moved by more than 1 %
    for path, (_, final) in record["act_steps"].items():  # the learned step is the installed one
        assert float(qmodel.get_submodule(path.rsplit(".", 1)[0]).get_submodule(
            path.rsplit(".", 1)[1]).scale) == pytest.approx(final)


def test_learned_zero_point_is_a_parameter_only_when_asked():
    from calibbench.quant.learned import LearnedStepQuantizer

    base = quant.UniformQuantizer(3, False, None, True)
    base.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    x = torch.linspace(-2, 4, 50)
    for learn, grads in ((False, 1), (True, 2)):
        q = LearnedStepQuantizer(base, learn_zero_point=learn)
        assert len(q.parameters_to_learn()) == grads
        out = q(x)
        assert torch.allclose(out, base.fake_quantize(x), atol=1e-6)  # starts on the base grid
        out.pow(2).sum().backward()
        assert q.step.grad is not None and (q.zp.grad is not None) == learn


def test_mse_init_gives_the_mse_observer_grids(compose, make_ctx, tiny_data):
    """refine.init=mse: weights per channel and activations per tensor by quant/observers.py's
    MSEObserver (p = quant.mse_p); init=calibrated keeps the calibration grid (min/max here)."""
    from calibbench.quant.observers import MSEObserver

    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = make_ctx(Toy(), tiny_data, refine_unit_steps=0, refine_unit_batch_size=8)
    for init in ("mse", "calibrated"):
        qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
        before = {n: q.scale.clone() for n, _, q in quant.quantizers(qmodel)}
        record = reconstruct(qmodel, images, ctx, _recon_cfg(compose, "qdrop", f"refine.init={init}"), "qdrop")
        assert record["init"]["name"] == init
        for layer in _layers(qmodel):
            wq = layer.weight_quantizer
            obs = MSEObserver(wq.bits, wq.symmetric, 0, wq.include_zero, steps=100, p=2.4)
            obs(layer.weight.detach())
            want = obs.calculate_qparams()[0] if init == "mse" else before[_name(qmodel, wq)]
            assert torch.allclose(wq.scale, want), init
        acts = {n: q for n, kind, q in quant.quantizers(qmodel) if kind != "weight"}
        changed = [n for n, q in acts.items() if not torch.equal(q.scale, before[n])]
        assert (len(changed) == len(acts)) if init == "mse" else not changed


def _name(model: nn.Module, q: nn.Module) -> str:
    return next(n for n, _, other in quant.quantizers(model) if other is q)


@pytest.mark.parametrize("cfg", [DFQ, ACADEMIC], ids=["dfq_legacy", "academic"])
def test_adaround_layer_unit_ends_after_bn_and_activation(cfg):
    images = torch.randn(8, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), cfg, 4, images)
    with torch.no_grad(), quantization_off(qmodel):
        units, used = build_units(qmodel, "layer", images[:1])
    paths = {u.name: u.paths for u in units}
    assert paths["features.0"] == ["features.0", "features.1", "features.2"]  # conv, bn (Identity), relu
    assert paths["features.3.body.0"] == ["features.3.body.0", "features.3.body.1", "features.3.body.2"]
    assert paths["features.3.body.3"] == ["features.3.body.3", "features.3.body.4"]  # the add follows
    assert paths["features.3.shortcut"] == ["features.3.shortcut"] and paths["fc"] == ["fc"]
    # the unit runs as the model does: its output is what the activation returned
    with torch.no_grad(), quantization_off(qmodel):
        unit = units[0]
        want = capture_output(qmodel, qmodel.get_submodule(unit.paths[-1]), images)
        assert torch.allclose(unit.run(unit.modules(qmodel), images), want)
        assert float(want.min()) >= 0  # after the ReLU


def test_adaround_records_the_units_modules(compose, make_ctx, tiny_data):
    record, _, _ = _toy_run(compose, make_ctx, tiny_data, "adaround")
    assert record["units"][0]["modules"] == ["features.0", "features.1", "features.2"]


def _annealed_beta(t: int, steps: int, warm: int, start: float = 20.0, end: float = 2.0) -> float:
    """AdaRound's beta schedule as the reference code writes it (BRECQ/QDrop ``LinearTempDecay``):
    ``start`` until the warm-up ends, then linear to ``end`` at the last iteration."""
    if t < warm:
        return start
    rel = (t - warm) / (steps - warm)
    return end + (start - end) * max(0.0, 1.0 - rel)


def test_beta_schedule_and_regulariser_warm_up(compose, monkeypatch):
    from calibbench.refine.recon import Stage, UnitTrainer, beta_at, unit_data

    assert beta_at(0, 100, 20, (20.0, 2.0)) == 20.0 and beta_at(20, 100, 20, (20.0, 2.0)) == 20.0
    assert beta_at(60, 100, 20, (20.0, 2.0)) == pytest.approx(11.0)
    assert beta_at(100, 100, 20, (20.0, 2.0)) == pytest.approx(2.0)
    for steps, warm in ((100, 20), (20000, 4000), (10, 2), (7, 0)):  # every iteration, the formula
        for t in range(steps + 1):
            assert beta_at(t, steps, warm, (20.0, 2.0)) == pytest.approx(_annealed_beta(t, steps, warm)), (t, steps)
    images = torch.randn(16, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images).requires_grad_(False)
    unit = build_units(qmodel, "block", images[:1])[0][0]
    cfg = _recon_cfg(compose, "adaround")
    assert (cfg.beta, cfg.warmup, cfg.round_lambda) == ([20.0, 2.0], 0.2, 0.01)  # AdaRound's values
    stage = Stage("weights", 10, True, False, 1e-3, 0.0)
    calls: list[float] = []
    regs: list[float] = []
    real = AdaRound.regularizer

    def spy(self, b):  # noqa: ANN001, ANN202
        calls.append(b)
        value = real(self, b)
        regs.append(float(value.detach()))
        return value

    monkeypatch.setattr(AdaRound, "regularizer", spy)
    # the reconstruction term is zeroed: what a step reports is lambda x the regulariser alone
    monkeypatch.setattr(recon, "recon_loss", lambda out, *args, **kwargs: out.sum() * 0.0)
    data = unit_data(qmodel, unit, images, cfg, 8, torch.device("cpu"), stage)
    values = []
    with UnitTrainer(qmodel, unit, data, cfg, stage, 8, torch.Generator().manual_seed(0), "t") as trainer:
        assert trainer.warm == 2  # 20 % of 10 iterations
        for it in range(10):
            before = len(regs)
            values.append((trainer.step(it), regs[before:]))
    per_step = len(trainer.roundings)
    assert per_step > 0 and len(calls) == 8 * per_step  # none before it = 2
    assert calls == [c for t in range(2, 10) for c in [_annealed_beta(t, 10, 2)] * per_step]
    for it, (value, reg) in enumerate(values):
        assert value == (0.0 if it < 2 else pytest.approx(0.01 * sum(reg), rel=1e-5))


@pytest.mark.parametrize("drop", [1.0, 0.0, 0.25, 0.3])
def test_qdrop_mixes_in_the_float_input(compose, drop):
    """The unit's input: drop_prob=1 is the FP model's input exactly, 0 the quantized model's, in
    between an element-wise mix with a share drop_prob of FP elements (0.25: the exact byte path of
    bernoulli_mask, 0.3: its uniform path)."""
    from calibbench.refine.capture import capture_input
    from calibbench.refine.recon import Stage, UnitTrainer, unit_data

    images = torch.randn(16, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images).requires_grad_(False)
    unit = build_units(qmodel, "block", images[:1])[0][1]  # the first residual unit: input quantized
    cfg = _recon_cfg(compose, "qdrop", f"refine.drop_prob={drop}")
    stage = Stage("weights", 1, True, True, 1e-3, drop)
    first = qmodel.get_submodule(unit.paths[0])
    with torch.no_grad():
        q_in = capture_input(qmodel, first, images)
        with quantization_off(qmodel):
            fp_in = capture_input(qmodel, first, images)
    differ = q_in != fp_in
    assert float(differ.float().mean()) > 0.3  # post-ReLU zeros are the same in both
    got: list[torch.Tensor] = []
    data = unit_data(qmodel, unit, images, cfg, 16, torch.device("cpu"), stage)
    with UnitTrainer(qmodel, unit, data, cfg, stage, 16, torch.Generator().manual_seed(0), "t") as trainer:
        run = unit.run
        unit.run = lambda modules, x: got.append(x.detach().clone()) or run(modules, x)
        trainer.step(0)
        idx = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    seen, fp, q, differ = got[0], fp_in[idx], q_in[idx], differ[idx]
    if drop == 1.0:
        assert torch.equal(seen, fp)
    elif drop == 0.0:
        assert torch.equal(seen, q)
    else:
        assert torch.equal(seen, torch.where(seen == fp, fp, q))  # every element is one of the two
        share = float((seen == fp)[differ].float().mean())  # FP share where the two differ
        assert share == pytest.approx(drop, abs=0.03), share  # ~6k elements: 4 sd < 0.025


@pytest.mark.parametrize("drop", [1.0, 0.0, 0.25])
def test_unit_activation_quantizer_drops_to_the_float_value(drop):
    """QDrop inside the unit (UnitActQuantizer, the module that mixes): each output element is the
    quantizer's input x (unquantized) with probability drop_prob, else its fake-quantized value."""
    from calibbench.quant.unit_act import UnitActQuantizer

    images = torch.randn(16, 3, 8, 8)
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    inner = next(q for q in _act_quantizers(qmodel) if q.ch_axis is None)
    x = torch.randn(32, 8, 8, 8, generator=torch.Generator().manual_seed(2)).abs() * 2
    with torch.no_grad():
        quantized = inner(x)
        differ = quantized != x
        assert float(differ.float().mean()) > 0.9
        torch.manual_seed(0)
        out = UnitActQuantizer(inner, drop)(x)
    if drop == 1.0:
        assert torch.equal(out, x)
    elif drop == 0.0:
        assert torch.allclose(out, quantized, atol=1e-6)
    else:
        is_fp = out == x
        assert torch.allclose(out[~is_fp], quantized[~is_fp], atol=1e-6)
        assert float(is_fp[differ].float().mean()) == pytest.approx(drop, abs=0.02)


def test_fresh_generator_batches_per_iteration(compose, make_ctx, tiny_data):
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = _calibrated(Toy().eval(), DFQ, 3, images)
    drawn: list[int] = []

    def sampler(n: int) -> torch.Tensor:
        drawn.append(n)
        return torch.randn(n, 3, 8, 8)

    ctx = make_ctx(Toy(), tiny_data, refine_unit_steps=3, refine_unit_batch_size=8)
    record = reconstruct(qmodel, images, ctx, _recon_cfg(compose, "qdrop"), "qdrop", sampler=sampler)
    assert record["source"] == "generator" and drawn == [8] * (3 * len(record["units"]))
    assert not any(u["cached"] for u in record["units"])


@pytest.mark.parametrize("override, message", [
    ("refine.init=minmax", r"unknown refine.init 'minmax'"),
    ("refine.procedure=three", r"unknown refine.procedure 'three'"),
    ("refine.p=0", r"refine.p=0.0 must be > 0"),
    ("refine.source=pool", r"unknown refine.source 'pool'"),
])
def test_bad_issue21_options_fail(compose, override, message):
    cfg = compose("refine=brecq", *SMOKE, override)
    with pytest.raises(ConfigError, match=message):
        refine.validate(cfg)


def test_two_stage_rejects_dropping(compose):
    with pytest.raises(ConfigError, match="needs refine.procedure=joint"):
        refine.validate(compose("refine=brecq", *SMOKE, "refine.drop_prob=0.5"))


def test_reference_preset_is_8bit_ends_and_an_unquantized_image(compose):
    from pytorchcv.model_provider import get_model

    model = get_model("resnet20_cifar10", pretrained=False).eval()
    cfg = compose("quant=reference").quant
    qmodel = quantize(model, cfg, 3, 3)
    rows = quant.quantizers(qmodel)
    weights = [q.bits for _, kind, q in quant.quantizers(qmodel) if kind == "weight"]
    inputs = [(path, q.bits) for path, kind, q in rows if kind == "input"]
    assert weights[0] == weights[-1] == 8 and set(weights[1:-1]) == {3}
    first = next(m for m in qmodel.modules() if isinstance(m, QuantConv2d))
    assert first.input_quantizer is None  # the image is not quantized
    assert inputs[-1][1] == 8 and {b for _, b in inputs[:-1]} == {3}
    assert quant.describe(qmodel)["preset"] == "reference"


def _fake_quant_drop_before(x, s, z, lo, hi, quantized):
    """FakeQuantDrop's forward as it was written before the pass count was cut (the reference the
    leaner kernel must reproduce bit for bit): out, d out/d x, the LSQ factor e."""
    u = x * (1.0 / s)
    r = torch.round(u)
    codes = r.clamp(lo - z, hi - z)
    clipped = r.sub(codes).abs_().sign_()
    if quantized is not None:
        clipped.mul_(quantized)
    passed = clipped.neg_().add_(1.0)
    e = u.mul(passed).neg_().add_(codes)
    if quantized is not None:
        e.mul_(quantized)
    q = codes.mul(s)
    if quantized is not None:
        q = q.mul_(quantized).add_((1.0 - quantized).mul_(x))
    return q, passed, e


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", [None, 0.5])
@pytest.mark.parametrize("learn_zp", [False, True])
def test_fake_quant_drop_is_bitwise_the_unfused_expression(dtype, drop, learn_zp):
    """The fused kernel (eq/ge masks, addcmul, grad_z only when the zero point learns) gives the
    same floats as the plain expression: output, input gradient, and the step/zero-point
    gradients as the same dot products."""
    from calibbench.quant.drop import FakeQuantDrop

    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(8, 4, 7, 7, generator=g, dtype=dtype))
    x[0, 0, 0, :3] = torch.tensor([0.5, -0.0, 2.5], dtype=dtype) * 0.25  # ties and a signed zero
    s, z = 0.25, 3.0
    quantized = None if drop is None else (torch.rand(x.shape, generator=g) >= drop).to(dtype)
    weight = torch.randn(x.shape, generator=g, dtype=dtype)
    xr = x.clone().requires_grad_(True)
    scale = torch.tensor(s, dtype=dtype, requires_grad=True)
    zp = torch.tensor(z, dtype=dtype, requires_grad=learn_zp)
    out = FakeQuantDrop.apply(xr, scale, zp, 0.0, 15.0, None if quantized is None else quantized.clone())
    grads = torch.autograd.grad((out * weight).sum(), (xr, scale, zp) if learn_zp else (xr, scale))
    want, passed, e = _fake_quant_drop_before(x, s, z, 0.0, 15.0, quantized)
    assert torch.equal(out.detach(), want)
    assert torch.equal(grads[0], weight * passed)
    assert torch.equal(grads[1], torch.dot(weight.reshape(-1), e.reshape(-1)))
    if learn_zp:
        flat = weight.reshape(-1)
        assert torch.equal(grads[2], (flat.sum() - torch.dot(flat, passed.reshape(-1))) * -s)


def test_bernoulli_mask_bytes_are_the_previous_draw():
    """The byte path compares the drawn bytes with 256·p directly; the mask is the one the
    earlier clamp(256·p − byte, 0, 1) arithmetic gave for the same seed."""
    from calibbench.quant.drop import bernoulli_mask

    like = torch.empty(5, 3, 11, 7)
    for p in (0.0, 0.25, 0.5, 1.0):
        torch.manual_seed(7)
        words = torch.randint(-2**63, 2**63 - 1, ((like.numel() + 7) // 8,), dtype=torch.int64)
        codes = words.view(torch.uint8)[:like.numel()].float()
        want = codes.neg_().add_(p * 256.0).clamp_(0.0, 1.0).view(like.shape)
        torch.manual_seed(7)
        assert torch.equal(bernoulli_mask(like, p), want)
        after = torch.rand(3)  # the stream moved by exactly the same draw
        torch.manual_seed(7)
        torch.randint(-2**63, 2**63 - 1, words.shape, dtype=torch.int64)
        assert torch.equal(after, torch.rand(3))
