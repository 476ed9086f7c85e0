"""Sweeps end to end: presets, summary files, resume, failing jobs, joblib and submitit launchers.

Every CLI call is a subprocess (~5 s of imports); jobs run at the smoke budget on 32 evaluation
images so the whole file stays around a minute on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# dataset.num_workers=0: 32 images decode faster in-process than DataLoader workers start, and
# loky (joblib) workers cannot start DataLoader workers at all (see test_failing_job_...).
FAST = ("budget=smoke", "num_samples=16", "budget.eval_limit=32", "dataset.num_workers=0")
SUBDIR = "budget.eval_limit=32,budget=smoke,dataset.num_workers=0,num_samples=16"  # sorted overrides


def sweep(tmp_path: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "calibbench", "-m", "logger.mode=disabled",
           f"paths.output_dir={tmp_path}", *args]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def the_sweep_dir(tmp_path: Path) -> Path:
    dirs = list((tmp_path / "sweeps").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def results(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("result.json")}


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Presets and paths (composition only: no jobs run)


@contextmanager
def hydra_loader_ctx() -> Iterator:
    """The config loader of an initialized Hydra (expands glob/range the way the sweeper does)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from calibbench.store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def grid_union_sweeper(conf: dict, loader):  # noqa: ANN001, ANN201
    """A GridUnionSweeper from the module Hydra's plugin scan loaded last: Hydra execs plugin
    modules itself, so a class imported before the scan can be another class object (then
    ``super()`` in its __init__ fails, depending on which tests ran first)."""
    import importlib
    from types import SimpleNamespace

    module = importlib.import_module("hydra_plugins.calibbench_sweeper.grid_union")
    sweeper = module.GridUnionSweeper(None, conf["params"], conf["grids"])
    sweeper.hydra_context = SimpleNamespace(config_loader=loader)
    return sweeper


def expand(loader, override: str) -> list[str]:  # noqa: ANN001
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=loader).parse_overrides([override])[0]
    return list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else [parsed.value()]


def sweeper_params(compose, preset: str) -> dict:  # noqa: ANN001
    cfg = compose(f"sweep={preset}", return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.callbacks.aggregate._target_ == "calibbench.report.AggregateCallback"
    return OmegaConf.to_container(cfg.hydra.sweeper.params)


def test_compare_sweeps_every_registered_strategy_bits_and_seeds(compose):
    from calibbench.strategies import available

    params = sweeper_params(compose, "compare")
    with hydra_loader_ctx() as loader:
        assert expand(loader, f"strategy={params['strategy']}") == available()  # no base_* schemas
        assert expand(loader, f"bits={params['bits']}") == ["3", "4", "6", "8"]  # W3A3 in every table
        assert expand(loader, f"model={params['model']}") == ["resnet20_cifar10", "resnet56_cifar10"]
        assert expand(loader, f"seed={params['seed']}") == ["0", "1", "2", "3", "4"]


def test_selectq_grid_sweeps_centroids_gamma_bits(compose):
    params = sweeper_params(compose, "selectq_grid")
    assert params["strategy"] == "selectq" and {"strategy.num_centroids", "strategy.gamma", "bits"} <= set(params)
    with hydra_loader_ctx() as loader:
        assert len(expand(loader, f"strategy.num_centroids={params['strategy.num_centroids']}")) > 1
        assert len(expand(loader, f"strategy.gamma={params['strategy.gamma']}")) > 1
    # The swept fields exist in the selectq schema: composing one grid point must validate.
    one = compose("strategy=selectq", "strategy.num_centroids=5", "strategy.gamma=0.1")
    assert (one.strategy.num_centroids, one.strategy.gamma) == (5, 0.1)


def test_variance_sweep_is_fifty_random_seeds_plus_five_of_each_other_strategy(compose):
    cfg = compose("sweep=variance", return_hydra_config=True)
    conf = OmegaConf.to_container(cfg.hydra.sweeper)
    assert conf["_target_"].endswith("grid_union.GridUnionSweeper")
    assert cfg.hydra.callbacks.aggregate._target_ == "calibbench.report.AggregateCallback"
    with hydra_loader_ctx() as loader:
        sweeper = grid_union_sweeper(conf, loader)
        jobs = [dict(o.split("=", 1) for o in job) for job in sweeper.job_overrides([])]
        assert len(jobs) == 2 * 50 + 2 * 3 * 5 and len({tuple(sorted(j.items())) for j in jobs}) == len(jobs)
        random_seeds = {(j["bits"], int(j["seed"])) for j in jobs if j["strategy"] == "random"}
        assert random_seeds == {(b, s) for b in ("3", "4") for s in range(50)}
        for other in ("selectq", "zeroq", "dsg"):
            assert sorted(int(j["seed"]) for j in jobs if j["strategy"] == other and j["bits"] == "3") == \
                list(range(5))
        assert {j["model"] for j in jobs} == {"resnet20_cifar10"}
        # A command-line value replaces the key in every grid; jobs both grids produce run once.
        only_random = sweeper.job_overrides(["strategy=random", "bits=3"])
        assert len(only_random) == 50


def test_sweep_subdir_is_readable_deterministic_and_leaves_out_run_options(compose, tmp_path):
    # FAST minus dataset.num_workers=0, which the composer's own defaults already add
    cfg = compose(*FAST[:-1], "strategy=random", "bits=6", "seed=3", f"paths.output_dir={tmp_path}",
                  "threads=1", "resume=true", return_hydra_config=True)
    assert cfg.hydra.sweep.subdir == f"random/resnet20_cifar10/bits6/seed3/{SUBDIR}"
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/sweeps/")
    assert len(Path(cfg.hydra.sweep.dir).name.rsplit("-", 1)[1]) == 6  # microseconds (DESIGN.md #3)


def test_slurm_preset_extends_submitit_slurm(compose):
    cfg = compose("hydra/launcher=slurm", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.cpus_per_task >= 1 and "partition" in launcher and "setup" in launcher


def test_threads_per_job_under_joblib():
    from calibbench.cli import _threads_per_job

    cpus = os.cpu_count() or 1
    assert _threads_per_job(OmegaConf.create({"n_jobs": 2})) == max(1, cpus // 2)
    assert _threads_per_job(OmegaConf.create({"n_jobs": -1})) == 1  # joblib: -1 = one job per CPU
    assert _threads_per_job(OmegaConf.create({"n_jobs": 1})) == cpus
    assert _threads_per_job(OmegaConf.create({"timeout_min": 60})) is None  # not joblib: leave it


# ---------------------------------------------------------------------------------------------
# Real sweeps (subprocesses)


@pytest.mark.slow
def test_two_by_two_sweep_writes_summary_and_resumes(tmp_path):
    sweep(tmp_path, "sweep=compare", "strategy=random", "model=resnet20_cifar10", "bits=4,8", "seed=0,1", *FAST)
    sweep_dir = the_sweep_dir(tmp_path)
    found = results(sweep_dir)
    assert sorted(found) == [f"random/resnet20_cifar10/bits{b}/seed{s}/{SUBDIR}" for b in (4, 8) for s in (0, 1)]
    assert all(r["status"] == "ok" for r in found.values())
    # A bits sweep reuses the selection: one calibration set per seed, found again at the other bits
    assert sorted((r["seed"], r["calibration"]["cache_hit"]) for r in found.values()) == \
        [(0, False), (0, True), (1, False), (1, True)]
    rows = summary_rows(sweep_dir)
    assert [(r["strategy"], r["w_bits"], r["n"], r["seeds"]) for r in rows] == \
        [("random", "4", "2", "0 1"), ("random", "8", "2", "0 1")]
    w4 = [r["metrics"]["quant"]["top1"] for r in found.values() if r["quant"]["w_bits"] == 4]
    assert float(rows[0]["top1_mean"]) == pytest.approx(sum(w4) / 2, abs=1e-4)
    assert (sweep_dir / "top1_vs_bits.png").stat().st_size > 1000
    assert re.search(r"^\| random +\|", (sweep_dir / "summary.md").read_text(), re.M)  # a pivot row

    # Interrupt: one job never wrote its result. Rerunning into the same dir redoes only that one.
    lost = sweep_dir / f"random/resnet20_cifar10/bits8/seed1/{SUBDIR}/result.json"
    lost.unlink()
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("result.json")}
    sweep(tmp_path, "sweep=compare", "strategy=random", "model=resnet20_cifar10", "bits=4,8", "seed=0,1", *FAST,
          f"hydra.sweep.dir={sweep_dir}")
    assert the_sweep_dir(tmp_path) == sweep_dir
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished jobs skipped
    assert json.loads(lost.read_text())["status"] == "ok"
    assert [r["n"] for r in summary_rows(sweep_dir)] == ["2", "2"]


@pytest.mark.slow
def test_failing_job_does_not_stop_a_joblib_sweep(tmp_path):
    # 60000 > the 50000-image train split: that job fails, the other must still run.
    # DataLoader workers (num_workers=1) inside joblib's loky workers: the loader's explicit
    # "fork" context is what makes this work (loky's default context cannot start them).
    # Every job runs and the summary is written; then the multirun exits 1 naming failures.csv.
    proc = sweep(tmp_path, "strategy=random", "budget=smoke", "budget.eval_limit=32", "dataset.num_workers=1",
                 "num_samples=16,60000", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", expect=1)
    sweep_dir = the_sweep_dir(tmp_path)
    assert f"1 of 2 jobs failed; see {sweep_dir / 'failures.csv'}" in proc.stderr
    by_n = {r["config"]["num_samples"]: r for r in results(sweep_dir).values()}
    assert by_n[16]["status"] == "ok" and by_n[60000]["status"] == "failed"
    assert "num_samples=60000" in by_n[60000]["error"]
    assert int(by_n[16]["config"]["threads"]) == max(1, (os.cpu_count() or 1) // 2)  # 2 jobs share the cores
    rows = {r["num_samples"]: r for r in summary_rows(sweep_dir)}
    assert (rows["16"]["n"], rows["60000"]["n"], rows["60000"]["n_failed"]) == ("1", "0", "1")
    with (sweep_dir / "failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    assert len(failures) == 1 and "num_samples=60000" in failures[0]["error"]
    assert "Failed jobs" in (md := (sweep_dir / "summary.md").read_text()) and "num_samples=60000" in md


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep(tmp_path, "strategy=random", "seed=0,1", *FAST, "threads=1", "hydra/launcher=submitit_local",
          "hydra.launcher.timeout_min=10")
    sweep_dir = the_sweep_dir(tmp_path)
    found = results(sweep_dir)
    assert len(found) == 2 and all(r["status"] == "ok" for r in found.values())
    assert any((sweep_dir / ".submitit").iterdir())  # ran through submitit, not in-process
    assert [r["n"] for r in summary_rows(sweep_dir)] == ["2"]
