"""Per-layer diagnostics: the streaming histogram, exact per-layer numbers on a hand-built model,
the pipeline step (files, same subset for every seed, accuracy untouched) and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from calibbench import quant
from calibbench.config import ConfigError
from calibbench.diagnostics import StreamingHistogram, measure, subset


def test_histogram_grows_both_ways_and_keeps_quantiles_within_one_bin():
    g = torch.Generator().manual_seed(0)
    hist = StreamingHistogram(256, 0.0, 1.0)
    parts = [torch.rand(5000, generator=g), torch.randn(5000, generator=g) * 4 + 3,
             torch.randn(5000, generator=g) - 6]  # beyond the top, then below the bottom
    for p in parts:
        hist.add(p)
    data = torch.cat(parts)
    assert float(hist.counts.sum()) == data.numel()  # merging bins never loses a count
    assert hist.lo <= float(data.min()) and float(data.max()) < hist.lo + hist.width
    for q in (0.001, 0.1, 0.5, 0.9, 0.999):
        assert abs(hist.quantile(q) - float(torch.quantile(data, q))) <= hist.bin_width + 1e-6
    with pytest.raises(ValueError, match="power of two"):
        StreamingHistogram(100, 0.0, 1.0)


def test_subset_is_fixed_by_its_own_seed():
    split = list(range(100, 1100))
    a, b, c = subset(split, 50, 0), subset(split, 50, 0), subset(split, 50, 1)
    assert a == b != c and len(set(a)) == 50 and a == sorted(a) and set(a) <= set(split)


@pytest.fixture
def tiny_quantized(compose):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    qmodel = quant.quantize(model, compose().quant, 4, 4)
    calib = torch.randn(32, 3, 8, 8) * 0.5  # narrower than the evaluation data: the range will clip
    quant.calibrate(qmodel, [calib])
    return model, qmodel


def test_per_layer_numbers_match_a_direct_computation(tiny_quantized):
    model, qmodel = tiny_quantized
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40) % 10
    before = qmodel(x)
    res = measure(model, qmodel, [(x[:16], y[:16]), (x[16:], y[16:])], torch.device("cpu"), bins=1024)
    layer, = res["layers"]  # one activation quantizer: the ReLU at "1"
    with torch.no_grad():
        act = torch.relu(qmodel[0](x))  # what reaches the quantizer in the quantized model
        q = qmodel[1].quantizer
        lo, hi = (float(t) for t in q.range())
        fp = torch.relu(model[0](x))
        out = q.fake_quantize(act)
    assert layer["name"] == "1" and layer["kind"] == "activation" and layer["bits"] == 4
    assert (layer["calib_lo"], layer["calib_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert layer["values"] == act.numel() and layer["eval_max"] == pytest.approx(float(act.max()))
    assert layer["clip_rate"] == pytest.approx(float((act > hi).float().mean())) and layer["clip_rate"] > 0
    assert layer["clip_low_rate"] == 0.0  # a ReLU output never goes below the range's 0
    # The histogram's bound holds for the inverse-CDF quantile (the value of rank ceil(q·n)); a
    # sparse tail makes torch.quantile's interpolation between order statistics differ from it.
    ordered = act.flatten().sort().values
    p999 = float(ordered[math.ceil(0.999 * len(ordered)) - 1])
    assert abs(layer["eval_p999"] - p999) <= layer["percentile_error_bound"] + 1e-6
    assert layer["range_inflation"] == pytest.approx((hi - lo) / (layer["eval_p999"] - layer["eval_p001"]))
    snr = 10 * math.log10(float(fp.square().sum()) / float((fp - out).square().sum()))
    assert layer["snr_db"] == pytest.approx(snr, rel=1e-4)
    local = 10 * math.log10(float(act.square().sum()) / float((act - out).square().sum()))
    assert layer["act_quant_snr_db"] == pytest.approx(local, rel=1e-4)
    assert res["images"] == 40
    # The model is left as it was: same outputs, fused path back on, no hooks behind.
    assert torch.equal(qmodel(x), before) and qmodel[1].fuse
    assert not qmodel[1].quantizer._forward_hooks and not qmodel[1].quantizer._forward_pre_hooks
    assert not model[1]._forward_hooks


def test_an_uncalibrated_model_has_nothing_to_diagnose(compose):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    qmodel = quant.quantize(model, compose().quant, 4, 4)
    with pytest.raises(ValueError, match="no calibrated activation quantizer"):
        measure(model, qmodel, [], torch.device("cpu"))


SMOKE = ("budget=smoke", "num_samples=16", "budget.eval_limit=64", "bits=3", "dataset.num_workers=0")


@pytest.mark.needs_shared
@pytest.mark.slow
def test_pipeline_writes_diagnostics_without_changing_accuracy(compose, tmp_path):
    from calibbench.pipeline import run

    def cfg(*extra):
        return compose(*SMOKE, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *extra)

    diag = ("diagnostics.enabled=true", "diagnostics.eval_images=48", "diagnostics.batch_size=32")
    a = run(cfg(*diag), tmp_path / "a")
    b = run(cfg(*diag, "seed=1"), tmp_path / "b")
    assert b["diagnostics"]["eval_images"] == 48
    off = run(cfg(), tmp_path / "off")
    assert a["metrics"]["quant"] == off["metrics"]["quant"]  # the extra pass changes no number
    assert "diagnostics" in a["timings"] and "diagnostics" not in off["timings"] and "diagnostics" not in off
    da = json.loads((tmp_path / "a" / "diagnostics.json").read_text())
    db = json.loads((tmp_path / "b" / "diagnostics.json").read_text())
    assert da["subset_key"] == db["subset_key"] and da["eval_images"] == da["images"] == 48
    assert len(da["layers"]) == 19  # resnet20: stem + 9 units × 2 ReLUs
    assert (tmp_path / "a" / "diagnostics.png").stat().st_size > 10000
    for layer in da["layers"]:
        assert 0.0 <= layer["clip_rate"] <= 1.0 and layer["calib_lo"] <= 0.0 < layer["calib_hi"]
        assert layer["eval_min"] <= layer["eval_p001"] <= layer["eval_p999"] <= layer["eval_max"] + 1e-6
        assert (layer["eval_max"] > layer["calib_hi"]) == (layer["clip_high_rate"] > 0)
        assert math.isfinite(layer["snr_db"]) and math.isfinite(layer["act_quant_snr_db"])
    assert a["diagnostics"]["eval_images"] == 48 and a["diagnostics"]["file"] == "diagnostics.json"
    assert da["layers"] != db["layers"]  # another seed's calibration set, other ranges


@pytest.mark.needs_shared
@pytest.mark.parametrize("n, message", [(0, "must be a positive integer"),
                                        (10001, "the test split has 10000 images; valid: 1..10000")])
def test_bad_eval_images_fail_before_any_work(compose, tmp_path, n, message):
    from calibbench.pipeline import run

    cfg = compose(*SMOKE, f"paths.output_dir={tmp_path}", "diagnostics.enabled=true",
                  f"diagnostics.eval_images={n}")
    with pytest.raises(ConfigError, match=f"diagnostics.eval_images={n}.*{message}"):
        run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "fp_eval" not in record["timings"] and "metrics" not in record
    assert not (tmp_path / "run" / "diagnostics.json").exists()


def test_command_line_alias_and_error(tmp_path):
    from calibbench.cli import _alias

    assert _alias("diagnostics=true") == "diagnostics.enabled=true"
    assert _alias("diagnostics=true,false") == "diagnostics.enabled=true,false"
    assert _alias("diagnostics.eval_images=5") == "diagnostics.eval_images=5"
    proc = subprocess.run([sys.executable, "-m", "calibbench", "diagnostics=true", "diagnostics.eval_images=-3",
                           "logger.mode=disabled", f"paths.output_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "diagnostics.eval_images=-3" in proc.stderr
