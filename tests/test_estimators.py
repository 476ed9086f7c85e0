"""The range estimator as a comparison axis: pooled vs per-batch estimates, the MSE search's Lp
norm, the config checks before any work, the estimators sweep preset, and the report keeping
estimators apart (row labels, paired differences and random's spread within one estimator)."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from test_report import config as result_config
from test_report import read_csv, row, summary_md
from test_report import write as write_result
from test_sweeps import grid_union_sweeper, hydra_loader_ctx

from calibbench import report
from calibbench.config import ConfigError, validate
from calibbench.quant.observers import build_observer
from calibbench.quant.quantizer import qrange, range_to_qparams


# -- observers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["percentile", "mse", "aciq"])
def test_pooled_estimate_equals_one_estimate_over_all_values(name):
    """With the pool large enough to hold everything, pooled == the estimator on the concatenation
    (what QDrop/BRECQ do: one search over the calibration forward); batch_mean differs."""
    torch.manual_seed(0)
    batches = [torch.distributions.Laplace(0.0, 1.0).sample((5_000,)) for _ in range(3)]
    batches.append(batches[0] * 4 + 2)  # one batch wider and shifted: the reductions disagree on it
    pooled = build_observer(name, 3, reduce="pooled", pool_values=10**6)
    per_batch = build_observer(name, 3, reduce="batch_mean")
    whole = build_observer(name, 3, reduce="batch_mean")
    for b in batches:
        pooled(b)
        per_batch(b)
    whole(torch.cat(batches))
    got, want, mean = (torch.stack(o.calculate_range()) for o in (pooled, whole, per_batch))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, mean, rtol=1e-3)


def test_pooled_sample_is_bounded_uniform_and_keeps_the_exact_range():
    """A pool smaller than the data holds pool_values values drawn from every batch, and the MSE
    search starts from the exact min/max (not the sample's)."""
    torch.manual_seed(1)
    batches = [torch.rand(40_000) + i for i in range(4)]  # batch i lives in [i, i + 1)
    obs = build_observer("mse", 4, reduce="pooled", pool_values=4_000)
    for b in batches:
        obs(b)
    assert obs._pool.shape == (1, 4_000)
    counts = [int(((obs._pool >= i) & (obs._pool < i + 1)).sum()) for i in range(4)]
    assert all(800 <= c <= 1_200 for c in counts), counts  # ~1,000 each: uniform over all values
    assert obs._min.item() == min(b.min().item() for b in batches)
    assert obs._max.item() == max(b.max().item() for b in batches)
    # Deterministic: the same data gives the same pool and range.
    again = build_observer("mse", 4, reduce="pooled", pool_values=4_000)
    for b in batches:
        again(b)
    assert torch.equal(again._pool, obs._pool) and torch.equal(torch.stack(again.calculate_range()),
                                                               torch.stack(obs.calculate_range()))


@pytest.mark.parametrize("p", [2.0, 2.4, 4.0])
def test_mse_search_minimises_the_lp_error_of_its_norm(p):
    """The chosen candidate has the lowest mean |x - q(x)|^p of all candidates, for its own p."""
    torch.manual_seed(2)
    x = torch.distributions.Laplace(0.0, 1.0).sample((30_000,)).relu()
    steps = 50
    obs = build_observer("mse", 3, mse_steps=steps, mse_p=p, reduce="pooled", pool_values=10**6)
    obs(x)
    lo, hi = obs.calculate_range()
    qmin, qmax = qrange(3, False)

    def err(c_hi: float) -> float:
        scale, zp = range_to_qparams(torch.tensor([0.0]), torch.tensor([c_hi]), 3, False, True)
        q = torch.clamp(torch.round(x / scale), qmin - zp, qmax - zp) * scale
        return (q - x).abs().pow(p).mean().item()

    errors = [err(x.max().item() * i / steps) for i in range(1, steps + 1)]
    assert lo.item() == 0.0
    assert err(hi.item()) == pytest.approx(min(errors), rel=1e-5)


def test_mse_norm_changes_the_choice():
    torch.manual_seed(3)
    x = torch.distributions.Laplace(0.0, 1.0).sample((30_000,)).relu()
    his = []
    for p in (2.0, 4.0):
        obs = build_observer("mse", 3, mse_p=p, reduce="pooled", pool_values=10**6)
        obs(x)
        his.append(obs.calculate_range()[1].item())
    assert his[1] > his[0]  # a higher norm weighs the clipped tail more: a wider range


@pytest.mark.parametrize("bits, alpha", [(3, 5.02), (4, 6.2), (8, 11.16)])
def test_aciq_one_sided_uses_banners_positive_table(bits, alpha):
    """Post-ReLU data: alpha / b from Banner et al.'s `alpha_laplace_positive` (5.02 at 3 bits,
    not the two-sided table's 5.03 at 4)."""
    torch.manual_seed(4)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50_000,)).relu()
    obs = build_observer("aciq", bits)
    obs(x)
    lo, hi = (t.item() for t in obs.calculate_range())
    b = (x - x.mean()).abs().mean().item()
    assert lo == 0.0 and hi == pytest.approx(min(x.max().item(), x.mean().item() + alpha * b), rel=1e-5)


# -- config checks before any work ---------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("quant.act_observer=kl", r"quant.act_observer.*'kl'.*minmax, ema, percentile, mse, aciq"),
    ("quant.weight_observer=aciq", r"quant.weight_observer.*'aciq'.*minmax, mse"),
    ("quant.observer_reduce=median", r"quant.observer_reduce.*'median'.*batch_mean, pooled"),
    ("quant.percentile=0", r"quant.percentile=0.0 is out of range; valid: \(50, 100\]"),
    ("quant.percentile=100.5", r"quant.percentile=100.5 is out of range"),
    ("quant.mse_steps=0", r"quant.mse_steps=0 must be an integer >= 1"),
    ("quant.mse_p=0", r"quant.mse_p=0.0 must be > 0"),
    ("quant.ema_decay=1.0", r"quant.ema_decay=1.0 must be in \[0, 1\)"),
    ("quant.pool_values=0", r"quant.pool_values=0 must be an integer >= 1"),
])
def test_bad_estimator_settings_fail_in_config_validation(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(override))


def test_preset_defaults_are_the_references_settings(compose):
    cfg = compose()
    assert (cfg.quant.observer_reduce, cfg.quant.mse_p) == ("pooled", 2.4)
    validate(compose("quant.act_observer=percentile", "quant.percentile=99.999"))


# -- sweep presets -------------------------------------------------------------------------------
def _jobs(compose, *args: str) -> list[dict[str, str]]:
    cfg = compose("sweep=estimators", return_hydra_config=True)
    conf = OmegaConf.to_container(cfg.hydra.sweeper)
    with hydra_loader_ctx() as loader:
        jobs = grid_union_sweeper(conf, loader).job_overrides(list(args))
    return [dict(o.split("=", 1) for o in job) for job in jobs]


def test_estimators_sweep_is_every_strategy_by_estimator_bits_and_seeds(compose):
    jobs = _jobs(compose)
    assert len(jobs) == 5 * 4 * 2 * (5 + 3) and len({tuple(sorted(j.items())) for j in jobs}) == len(jobs)
    assert {j["strategy"] for j in jobs} == {"random", "selectq", "zeroq", "dsg", "plf"}
    assert {j["quant.act_observer"] for j in jobs} == {"minmax", "percentile", "mse", "aciq"}
    assert {j["refine"] for j in jobs} == {"none"}  # PLF's synthetic set, calibration only
    assert {j.get("diagnostics.enabled") for j in jobs} == {"True"}
    seeds = {m: sorted({int(j["seed"]) for j in jobs if j["model"] == m})
             for m in ("resnet20_cifar10", "resnet56_cifar10")}
    assert seeds == {"resnet20_cifar10": [0, 1, 2, 3, 4], "resnet56_cifar10": [0, 1, 2]}
    one_model = _jobs(compose, "model=resnet20_cifar10")
    assert len(one_model) == 5 * 4 * 2 * 5


def test_variance_and_compare_take_the_estimator_as_a_swept_key(compose):
    cfg = compose("sweep=variance", return_hydra_config=True)
    conf = OmegaConf.to_container(cfg.hydra.sweeper)
    with hydra_loader_ctx() as loader:
        jobs = grid_union_sweeper(conf, loader).job_overrides(["quant.act_observer=minmax,mse"])
    assert len(jobs) == 2 * (2 * 50 + 2 * 3 * 5)
    assert {o for job in jobs for o in job if o.startswith("quant.")} == \
        {"quant.act_observer=minmax", "quant.act_observer=mse"}
    one = compose("sweep=compare", "quant.act_observer=mse", "quant.observer_reduce=batch_mean")
    validate(one)
    assert (one.quant.act_observer, one.quant.observer_reduce) == ("mse", "batch_mean")


# -- the default estimator (decided on val) and the papers' preset ------------------------------
@pytest.mark.parametrize("preset", ["dfq_legacy", "academic", "reference"])
def test_presets_default_to_the_mse_search_decided_on_val(compose, preset):
    cfg = compose(f"quant={preset}")
    q = cfg.quant
    assert (q.act_observer, q.observer_reduce, q.mse_p, q.weight_observer) == ("mse", "pooled", 2.4, "minmax")


def test_papers_minmax_preset_is_dfq_legacy_with_minmax_and_reuses_earlier_run_keys(compose):
    from calibbench.pipeline import run_key

    paper = compose("quant=dfq_paper")
    explicit = compose("quant=dfq_legacy", "quant.act_observer=minmax")
    assert (paper.quant.name, paper.quant.act_observer) == ("dfq_legacy", "minmax")
    # Same resolved config → same run key: resume and the cache find the runs made before the flip.
    assert run_key(paper) == run_key(explicit) != run_key(compose("quant=dfq_legacy"))
    assert compose("quant=dfq_paper", "bits=3").quant.fold_bn is False


# -- the report keeps estimators apart -----------------------------------------------------------
def write(root, sub: str, cfg: dict, top1: float):  # noqa: ANN001, ANN201
    return write_result(root, sub, cfg, top1, 90.0)


def _cfg(strategy: str, seed: int, act: str, bits: int = 3, **quant) -> dict:
    cfg = result_config(strategy, bits=bits, seed=seed)
    cfg["quant"].update({"act_observer": act, "weight_observer": "minmax", "observer_reduce": "pooled",
                         "percentile": 99.99, "mse_p": 2.4, "mse_steps": 100, "ema_decay": 0.9,
                         "pool_values": 65536, **quant})
    return cfg


def test_report_never_averages_estimators_and_pairs_within_one(tmp_path):
    # random: minmax 40/42/44, mse 60/62/64; selectq: minmax +3 per seed, mse -1 per seed.
    for seed in range(3):
        write(tmp_path, f"r/mm/{seed}", _cfg("random", seed, "minmax"), 40.0 + 2 * seed)
        write(tmp_path, f"r/mse/{seed}", _cfg("random", seed, "mse"), 60.0 + 2 * seed)
        write(tmp_path, f"s/mm/{seed}", _cfg("selectq", seed, "minmax"), 43.0 + 2 * seed)
        write(tmp_path, f"s/mse/{seed}", _cfg("selectq", seed, "mse"), 59.0 + 2 * seed)
    summary, _ = report.build(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 4 and "quant.act_observer" in rows[0]
    assert float(row(rows, strategy="random", **{"quant.act_observer": "mse"})["top1_mean"]) == 62.0
    sel_mse = row(rows, strategy="selectq", **{"quant.act_observer": "mse"})
    sel_mm = row(rows, strategy="selectq", **{"quant.act_observer": "minmax"})
    # Paired against random under the same estimator: -1 and +3 exactly (never 43-62 or 59-42).
    assert float(sel_mse["diff_random_mean"]) == -1.0 and float(sel_mm["diff_random_mean"]) == 3.0
    md = summary_md(tmp_path)
    # One table (the estimator is part of the row, not of the panel), rows labelled where the
    # estimator differs from the preset's (dfq_legacy: mse since issue 20; the papers' minmax is named).
    assert md.count("## Top-1:") == 1
    assert "| selectq · act_observer=minmax |" in md and "| selectq |" in md
    assert "| selectq · act_observer=mse |" not in md
    assert "### Strategy × range estimator" in md
    assert "act_observer=minmax · W3A3" in md and "preset default · W3A3" in md


def test_estimator_named_even_when_it_does_not_vary_and_spread_is_per_estimator(tmp_path):
    from calibbench.report.tables import VARIANCE_MIN_SEEDS

    n = VARIANCE_MIN_SEEDS
    for seed in range(n):
        write(tmp_path, f"r/{seed}", _cfg("random", seed, "percentile", observer_reduce="batch_mean"), 60.0 + seed)
    write(tmp_path, "s/0", _cfg("selectq", 0, "percentile", observer_reduce="batch_mean"), 60.0 + n)
    report.build(tmp_path)
    md = summary_md(tmp_path)
    # The folder is all percentile (not the preset's mse): still named, in the table and the spread's heading.
    assert "| random · act_observer=percentile, observer_reduce=batch_mean |" in md
    assert "### Random-calibration spread, W3A3 · act_observer=percentile, observer_reduce=batch_mean" in md
    assert "| selectq · act_observer=percentile, observer_reduce=batch_mean | 1 | 60.00 + 0 | 100.0 |".replace(
        "60.00 + 0", f"{60.0 + n:.2f}") in md


def test_unused_estimator_fields_never_split_identical_runs(tmp_path):
    """minmax reads neither observer_reduce nor mse_p: runs from before those fields existed and
    runs with other values of them are one cell; an old mse record counts as batch_mean, p = 2."""
    old = _cfg("random", 0, "minmax")
    for key in ("observer_reduce", "mse_p", "pool_values"):  # fields a record from before lacks
        del old["quant"][key]
    write(tmp_path, "old/0", old, 40.0)
    write(tmp_path, "new/1", _cfg("random", 1, "minmax", observer_reduce="batch_mean", mse_p=3.0), 42.0)
    legacy_mse = copy.deepcopy(old)
    legacy_mse["quant"]["act_observer"] = "mse"
    legacy_mse["seed"] = 0
    write(tmp_path, "oldmse/0", legacy_mse, 50.0)
    write(tmp_path, "newmse/1", _cfg("random", 1, "mse", observer_reduce="batch_mean", mse_p=2.0), 52.0)
    report.build(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 2, rows
    assert row(rows, **{"quant.act_observer": "minmax"})["n"] == "2"
    assert row(rows, **{"quant.act_observer": "mse"})["n"] == "2"


def test_activation_diagnostics_are_tabled_per_estimator(tmp_path):
    """Does the calibration set still change the ranges once the estimator clips? The report
    answers with one row per estimator, bits and strategy: mean ± std over seeds."""
    import json

    def diag(inflation: float, clip: float) -> dict:
        layer = {"kind": "activation", "range_inflation": inflation, "clip_rate": clip, "act_quant_snr_db": 10.0,
                 "bits": 3, "calib_lo": 0.0, "calib_hi": 4.0, "eval_min": 0.0, "eval_max": 5.0, "eval_p001": 0.0,
                 "eval_p999": 3.0, "snr_db": 9.0}
        return {"layers": [dict(layer, name="a"), dict(layer, name="b", range_inflation=inflation + 1.0),
                           dict(layer, name="c", range_inflation=inflation + 2.0),
                           dict(layer, name="w", kind="weight", range_inflation=99.0)]}

    for seed in range(2):
        for strategy, act, inflation in (("random", "minmax", 2.0), ("selectq", "minmax", 1.5),
                                         ("random", "mse", 1.0), ("selectq", "mse", 1.0)):
            path = write(tmp_path, f"{strategy}/{act}/{seed}", _cfg(strategy, seed, act), 50.0)
            (path.parent / "diagnostics.json").write_text(json.dumps(diag(inflation + seed, 0.01)))
    report.build(tmp_path)
    md = summary_md(tmp_path)
    assert "### Activation diagnostics per estimator" in md
    # median over the three activation layers (the weight row ignored), then mean ± std over 2 seeds
    assert "| act_observer=minmax | W3A3 | random | 2 | 3.50 ± 0.71 | 1.00 ± 0.00 | 10.00 ± 0.00 |" in md
    assert "| act_observer=minmax | W3A3 | selectq | 2 | 3.00 ± 0.71 |" in md
    assert "| preset default | W3A3 | random | 2 | 2.50 ± 0.71 |" in md
    # the preset's estimator first
    assert md.index("| preset default | W3A3 | random") < md.index("| act_observer=minmax | W3A3 | random")
