"""Config composition: every YAML composes, bad values fail with a message naming them."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from calibbench.config import ConfigError, effective_bits, validate
from calibbench.pipeline import resolve_device

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "dataset", "strategy", "quant", "refine", "budget", "logger", "experiment", "sweep"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_yaml_composes(compose, group, option):
    cfg = compose(f"{group}={option}")
    if group not in ("experiment", "sweep"):
        assert group in cfg
    if group == "model":  # each model brings its own dataset, so the pair always matches
        assert cfg.model.num_classes == cfg.dataset.num_classes
        validate(cfg)


def test_default_is_random_on_offline_pair(compose):
    cfg = compose()
    assert (cfg.strategy.name, cfg.model.name, cfg.dataset.name) == ("random", "resnet20_cifar10", "cifar10_jpeg")
    assert cfg.num_samples == 256 and cfg.quant.name == "dfq_legacy" and cfg.refine.name == "none"
    validate(cfg)


def test_job_name_is_calibbench(compose):
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.job.name == "calibbench"


def test_bits_not_an_int_fails_at_compose(compose):
    with pytest.raises((ValidationError, ConfigCompositionException), match="abc"):
        compose("bits=abc")


def test_strategy_schema_types_are_enforced(compose):
    with pytest.raises((ValidationError, ConfigCompositionException), match="class_balanced"):
        compose("strategy.class_balanced=maybe")
    with pytest.raises(ConfigCompositionException, match="not_a_field"):
        compose("strategy.not_a_field=1")


def test_export_exact_is_a_bool(compose):
    """``export_exact``: true (the bit-exact graph, default) or false (the fused QDQ graph);
    anything else fails at compose (typed bool) or, from an untyped config, in validate."""
    from omegaconf import OmegaConf

    assert compose().export_exact is True and compose("export_exact=false").export_exact is False
    with pytest.raises((ValidationError, ConfigCompositionException), match="export_exact=fused"):
        compose("export_exact=fused")
    untyped = OmegaConf.create(OmegaConf.to_container(compose("export=onnx")) | {"export_exact": "fused"})
    with pytest.raises(ConfigError, match="export_exact='fused' must be true .* or false"):
        validate(untyped)


@pytest.mark.parametrize("bits", [0, 1, 33, -4])
def test_bits_out_of_range(compose, bits):
    with pytest.raises(ConfigError, match=rf"bits={bits} .*valid: integers 2\.\.16"):
        validate(compose(f"bits={bits}"))


def test_w_a_bits_override(compose):
    cfg = compose("bits=4", "quant.a_bits=8")
    assert effective_bits(cfg) == (4, 8)
    with pytest.raises(ConfigError, match="quant.w_bits=1"):
        validate(compose("quant.w_bits=1"))


@pytest.mark.parametrize("n", [0, -1])
def test_num_samples_positive(compose, n):
    with pytest.raises(ConfigError, match=f"num_samples={n}"):
        validate(compose(f"num_samples={n}"))


def test_model_dataset_class_mismatch(compose):
    with pytest.raises(ConfigError, match="100 classes .* has 10"):
        validate(compose("model=resnet20_cifar100", "dataset=cifar10_jpeg"))


@pytest.mark.parametrize(("override", "names"), [
    ("strategy=nope", "random"), ("model=nope", "resnet20_cifar10"),
    ("dataset=nope", "cifar10_jpeg"), ("quant=nope", "dfq_legacy"), ("budget=nope", "smoke")])
def test_unknown_group_option_lists_choices(compose, override, names):
    with pytest.raises(ConfigCompositionException, match=names):
        compose(override)


def test_unknown_observer_lists_choices(compose):
    with pytest.raises(ConfigError, match="'bogus'.*minmax, ema, percentile, mse, aciq"):
        validate(compose("quant.act_observer=bogus"))


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    assert str(resolve_device("auto")) == "cpu"
