"""What makes a comparison trustworthy: cache keys that cannot go stale, a validation split held out
of every pool, independent random streams, seeded calibration order, no import cycle."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf.errors import ConfigAttributeError

from calibbench import cache as cache_mod
from calibbench import pipeline, strategies
from calibbench.cache import content_key, source_digest
from calibbench.config import ConfigError
from calibbench.seeding import stream_seed


class _Built:
    weights_id = "w0"


def _key(compose, tiny_data, *overrides: str) -> str:
    """The calibration cache key the pipeline would use for this config on ``tiny_data``."""
    cfg = compose("budget=smoke", *overrides)
    strategy = strategies.build(cfg.strategy)
    ctx = strategies.StrategyContext(torch.nn.Identity(), tiny_data, torch.device("cpu"), cfg.seed,
                                     cfg.num_samples, pipeline.calibration_budget(cfg.budget), False)
    return content_key(pipeline.calibration_key(cfg, strategy, ctx, _Built(), tiny_data))


@pytest.mark.parametrize("change", [
    ("strategy=selectq", "budget.eval_batch_size=50"),  # SelectQ's forward batch falls back to it
    ("strategy=selectq", "budget.pool_size=32"),
    ("strategy=selectq", "strategy.pool_size=32"),
    ("strategy=selectq", "strategy.gamma=2"),
    ("dataset.resize=40",), ("dataset.root=/elsewhere",), ("dataset.val_size=10",),
    ("dataset.val_seed=1",), ("dataset.train_per_class=5",), ("seed=1",), ("num_samples=17",),
    ("budget.calib_batch_size=7",),
    ("model=resnet56_cifar10",),  # the weights enter through the built model's weights_id
])
def test_any_input_of_the_set_misses_the_cache(compose, tiny_data, change):
    base = [c for c in change if c.startswith("strategy=")]
    assert _key(compose, tiny_data, *base) != _key(compose, tiny_data, *change)


@pytest.mark.parametrize("change", [
    ("logger.mode=offline",), ("progress=true",), ("threads=1",), ("bits=8",), ("quant=academic",),
    ("budget.eval_limit=10",), ("eval_split=val",), ("dataset.num_workers=3",), ("refine=none",),
    ("export=onnx",), ("export=onnx", "export_exact=false"),
])
def test_how_a_run_is_logged_or_evaluated_hits_the_cache(compose, tiny_data, change):
    assert _key(compose, tiny_data) == _key(compose, tiny_data, *change)


def test_export_form_is_in_the_run_key_only_with_export(compose):
    """``export_exact`` changes what an exporting run evaluates (the exact or the fused graph's
    arithmetic); without export it is never read, and runs keep the keys they had before it."""
    key = pipeline.run_key
    assert key(compose()) == key(compose("export_exact=false"))
    assert key(compose("export=onnx")) != key(compose("export=onnx", "export_exact=false"))


def test_null_fallbacks_are_resolved_before_hashing(compose, tiny_data):
    """``strategy.batch_size=null`` and the explicit value it resolves to are the same set."""
    assert _key(compose, tiny_data, "strategy=selectq") == \
        _key(compose, tiny_data, "strategy=selectq", "strategy.batch_size=100")  # smoke eval batch


def test_strategies_cannot_read_budget_fields_outside_the_key(compose):
    view = pipeline.calibration_budget(compose("budget=smoke").budget)
    assert view.synth_iterations == 4
    with pytest.raises(ConfigAttributeError, match="eval_limit"):
        _ = view.eval_limit


def test_source_digest_follows_imports(monkeypatch):
    before = source_digest(["calibbench.strategies.random"])
    assert before == source_digest(["calibbench.strategies.random"])
    real = cache_mod._module_source.__wrapped__

    def edited(name):
        origin, text = real(name)
        return origin, text + ("\n# changed\n" if name == "calibbench.datasets" else "")

    monkeypatch.setattr(cache_mod, "_module_source", edited)
    assert source_digest(["calibbench.strategies.random"]) != before  # random → base → datasets
    assert source_digest(["calibbench.quant.quantizer"]) == \
        source_digest(["calibbench.quant.quantizer"])  # it imports no calibbench module: unchanged


def test_holdout_pool_and_eval_set(tiny_data):
    from calibbench.datasets import DataModule, holdout_indices

    held = holdout_indices(64, 16, 0)
    assert held == holdout_indices(64, 16, 0) != holdout_indices(64, 16, 1)
    data = DataModule("tiny", tiny_data.train, tiny_data.test, 10, 32, tiny_data.mean, tiny_data.std, 0,
                      held)
    assert len(held) == 16 and not set(held) & set(data.pool.tolist())
    assert sorted(held + data.pool.tolist()) == list(range(64))
    ds, idx = data.eval_set("val")
    assert ds is data.train and idx == held
    ds, idx = data.eval_set("val", limit=4)
    assert len(idx) == 4 and set(idx) <= set(held)
    ds, idx = data.eval_set("test")
    assert ds is data.test and idx == list(range(len(data.test)))
    with pytest.raises(ConfigError, match="eval_split 'train'; valid choices: test, val"):
        data.eval_set("train")
    with pytest.raises(ConfigError, match="dataset.val_size > 0"):
        tiny_data.eval_set("val")


def test_random_draws_only_from_the_pool_and_streams_are_independent(compose, tiny_data, make_ctx):
    from calibbench.datasets import DataModule, holdout_indices

    held = holdout_indices(64, 20, 0)
    data = DataModule("tiny", tiny_data.train, tiny_data.test, 10, 32, tiny_data.mean, tiny_data.std, 0,
                      held)
    strat = strategies.build(compose().strategy)
    for seed in range(5):
        ctx = make_ctx(torch.nn.Identity(), data, num_samples=40, seed=seed)
        idx = strat.calibration_set(ctx).info["indices"]
        assert not set(idx) & set(held)
        assert sorted(idx) == sorted(ctx.pool_permutation()[:40].tolist())  # head of the shared order
    assert stream_seed(0, "pool") != stream_seed(1, "pool") != stream_seed(0, "selectq/order")
    # seed s+1 of one stream never replays seed s of another (the old seed + offset scheme did)
    assert not {stream_seed(s + 1, "pool") for s in range(100)} & {stream_seed(s, "selectq/order")
                                                                    for s in range(100)}


def test_calibration_order_is_a_seeded_recorded_permutation(compose, tmp_path):
    cfg = compose("budget=smoke", "num_samples=32", f"paths.output_dir={tmp_path}")
    record = pipeline.run(cfg, tmp_path / "a")
    order = record["calibration"]["calibrate_order"]
    assert sorted(order) == list(range(32)) and order != list(range(32))
    cfg.resume = False
    assert pipeline.run(cfg, tmp_path / "b")["calibration"]["calibrate_order"] == order


def test_config_does_not_import_the_registries():
    code = "import sys, calibbench.config; print(any(m.startswith(('calibbench.strategies', " \
           "'calibbench.refine')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
