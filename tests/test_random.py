import pytest
import torch

from calibbench.config import ConfigError
from calibbench.strategies import available, build


def test_registry_lists_and_rejects(compose):
    assert "random" in available()
    cfg = compose()
    cfg.strategy.name = "nope"
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'; valid choices: .*random"):
        build(cfg.strategy)


def test_seeded_and_recorded(compose, tiny_data, make_ctx):
    strat = build(compose().strategy)
    model = torch.nn.Identity()
    a = strat.calibration_set(make_ctx(model, tiny_data, num_samples=12, seed=1))
    b = strat.calibration_set(make_ctx(model, tiny_data, num_samples=12, seed=1))
    c = strat.calibration_set(make_ctx(model, tiny_data, num_samples=12, seed=2))
    assert a.info["indices"] == b.info["indices"] != c.info["indices"]
    assert len(set(a.info["indices"])) == 12
    idx = a.info["indices"]
    assert torch.equal(a.images, tiny_data.train.images[idx])
    assert a.labels.tolist() == [tiny_data.train.targets[i] for i in idx]


def test_class_balanced(compose, tiny_data, make_ctx):
    strat = build(compose("strategy.class_balanced=true").strategy)
    calib = strat.calibration_set(make_ctx(torch.nn.Identity(), tiny_data, num_samples=23))
    counts = torch.bincount(calib.labels, minlength=10)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1


def test_pool_too_small(compose, tiny_data, make_ctx):
    strat = build(compose().strategy)
    with pytest.raises(ConfigError, match="num_samples=65 is larger than the calibration pool \\(64"):
        strat.calibration_set(make_ctx(torch.nn.Identity(), tiny_data, num_samples=65))
