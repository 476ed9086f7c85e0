"""report.py on hand-made result.json files: the aggregation numbers, what splits a cell, failures."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from calibbench import report


def config(strategy: str = "random", bits: int = 4, seed: int = 0, quant: str = "dfq_legacy",
           dataset: str = "cifar10_jpeg", model: str = "resnet20_cifar10", budget: str = "smoke",
           num_samples: int = 16, w_bits: Optional[int] = None, **strategy_fields: Any) -> dict:
    """The shape of a resolved config as the pipeline records it (only the fields that matter here)."""
    return {"model": {"name": model, "arch": f"{model}_arch"}, "dataset": {"name": dataset, "num_classes": 10},
            "quant": {"name": quant, "w_bits": w_bits, "a_bits": None, "act_observer": "mse",
                      "observer_reduce": "pooled", "mse_p": 2.4, "mse_steps": 100, "pool_values": 65536},
            "budget": {"name": budget, "pool_size": 256}, "refine": {"name": "none"},
            "strategy": {"name": strategy, **strategy_fields},
            "logger": {"mode": "disabled"}, "paths": {"output_dir": f"/tmp/out{seed}"},
            "bits": bits, "seed": seed, "num_samples": num_samples, "device": "cpu",
            "progress": False, "resume": True, "threads": None}


def write(root: Path, sub: str, cfg: dict, top1: Optional[float] = None, top5: Optional[float] = None,
          fp: float = 88.0, status: str = "ok", error: Optional[str] = None,
          run_key: Optional[str] = None, deviations: Optional[list[str]] = None) -> Path:
    record: dict[str, Any] = {"status": status, "run_key": run_key or sub, "seed": cfg["seed"],
                              "config": cfg, "finished_at": "2025-01-01T00:00:00+00:00"}
    if deviations is not None:
        record["calibration"] = {"paper_deviations": deviations}
    if status == "ok":
        record["metrics"] = {"fp": {"top1": fp, "top5": 99.0, "n": 200},
                             "quant": {"top1": top1, "top5": top5, "n": 200}}
    if error:
        record["error"] = error
    path = root / sub / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def summary_md(folder: Path) -> str:
    """summary.md with the column padding of to_markdown collapsed: '| random   | 20.00 |' reads
    as '| random | 20.00 |', so assertions name the cells, not the alignment."""
    return re.sub(r"(?<=\S) {2,}\|", " |", re.sub(r"\| {2,}", "| ", (folder / "summary.md").read_text()))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def row(rows: list[dict[str, str]], **match: Any) -> dict[str, str]:
    found = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_mean_and_sample_std_over_seeds(tmp_path):
    for seed, (t1, t5) in enumerate([(10.0, 50.0), (20.0, 52.0), (30.0, 54.0)]):
        write(tmp_path, f"random/w4/seed{seed}", config(seed=seed), t1, t5, fp=88.0 + seed)
    write(tmp_path, "random/w8/seed0", config(bits=8), 80.0, 95.0)
    summary, files = report.build(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 2 and summary.n_ok == 4 and not summary.failures
    w4 = row(rows, w_bits=4)
    # By hand: mean(10, 20, 30) = 20, sample std = sqrt(((-10)² + 0² + 10²) / 2) = 10; top-5: 52 ± 2.
    assert (w4["n"], w4["seeds"], w4["a_bits"]) == ("3", "0 1 2", "4")
    assert float(w4["top1_mean"]) == 20.0 and float(w4["top1_std"]) == 10.0
    assert float(w4["top5_mean"]) == 52.0 and float(w4["top5_std"]) == 2.0
    assert float(w4["fp_top1"]) == 89.0  # FP beside: mean of 88, 89, 90
    w8 = row(rows, w_bits=8)
    assert w8["n"] == "1" and float(w8["top1_mean"]) == 80.0 and w8["top1_std"] == ""  # no std from 1 seed
    md = summary_md(tmp_path)
    assert "| random | 20.00 ± 10.00 | 80.00 |" in md  # pivot: strategy × bits
    assert "FP top-1: 88.50" in md and "## Failed jobs" in md and "None." in md
    assert (tmp_path / "top1_vs_bits.png").stat().st_size > 1000
    assert {p.name for p in files} >= {"summary.csv", "summary.md", "failures.csv", "top1_vs_bits.png"}
    assert list(summary.columns) == ["dataset", "model", "quant", "budget", "eval_split", "num_samples",
                                     "strategy", "w_bits", "a_bits"]


def test_presets_datasets_budgets_and_sizes_are_never_mixed(tmp_path):
    variants = {"base": {}, "academic": {"quant": "academic"}, "c10": {"dataset": "cifar10"},
                "paper": {"budget": "paper"}, "n32": {"num_samples": 32}, "r56": {"model": "resnet56_cifar10"},
                "w8a4": {"w_bits": 8}}
    for i, (name, kw) in enumerate(variants.items()):
        for seed in (0, 1):
            cfg = config(seed=seed, **kw)
            cfg["dataset"]["num_workers"] = seed * 2  # how images were loaded: never splits a cell
            write(tmp_path, f"{name}/seed{seed}", cfg, 40.0 + i + seed, 90.0)
    summary, _ = report.build(tmp_path, plots=False)
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == len(variants) and all(r["n"] == "2" for r in rows)
    assert {float(r["top1_mean"]) for r in rows} == {40.5 + i for i in range(len(variants))}
    assert row(rows, quant="academic")["top1_mean"] == "41.5"
    assert row(rows, dataset="cifar10")["top1_mean"] == "42.5"
    assert row(rows, w_bits=8, a_bits=4)["top1_mean"] == "46.5"  # quant.w_bits overrides bits
    # Fields that follow from a name (model.arch) or only describe the run (paths, logger) are not columns.
    assert "model.arch" not in summary.columns and not any(c.startswith("paths") for c in summary.columns)


def test_swept_strategy_fields_become_columns_and_heatmap(tmp_path):
    for k in (2, 5):
        for gamma in (0.1, 1.0):
            for seed in (0, 1):
                write(tmp_path, f"selectq/k{k}/g{gamma}/s{seed}",
                      config("selectq", seed=seed, num_centroids=k, gamma=gamma, select="lowest"),
                      k * 10 + gamma + seed, 90.0)
    write(tmp_path, "random/s0", config("random", class_balanced=False), 33.0, 80.0)
    summary, files = report.build(tmp_path)
    assert summary.columns[6:9] == ["strategy", "strategy.gamma", "strategy.num_centroids"]
    assert "strategy.select" not in summary.columns  # constant within selectq
    assert "strategy.class_balanced" not in summary.columns  # constant within random
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 5
    assert float(row(rows, **{"strategy.num_centroids": 5, "strategy.gamma": 1.0})["top1_mean"]) == 51.5
    assert row(rows, strategy="random")["strategy.gamma"] == ""  # not a random field: blank, not mixed
    md = summary_md(tmp_path)
    assert "| selectq (gamma=0.1, num_centroids=2) | 20.60 ± 0.71 |" in md
    assert "selectq_heatmap.png" in {p.name for p in files}


def test_failures_are_listed_and_counted_not_hidden(tmp_path):
    write(tmp_path, "ok/seed0", config(num_samples=16), 50.0, 90.0)
    write(tmp_path, "big/seed0", config(num_samples=60000), status="failed",
          error="ConfigError: num_samples=60000 is larger than the calibration pool\nmore")
    write(tmp_path, "cut/seed1", config(seed=1, num_samples=16), status="running")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "result.json").write_text('{"status": "ok", "conf')
    summary, _ = report.build(tmp_path, plots=False)
    assert summary.n_ok == 1 and len(summary.failures) == 3
    rows = read_csv(tmp_path / "summary.csv")
    assert row(rows, num_samples=16)["n_failed"] == "1"  # the interrupted seed 1 of the same config
    big = row(rows, num_samples=60000)
    assert (big["n"], big["n_failed"], big["top1_mean"]) == ("0", "1", "")
    failures = {r["job"]: r for r in read_csv(tmp_path / "failures.csv")}
    assert set(failures) == {"big/seed0", "cut/seed1", "torn"}
    assert failures["big/seed0"]["error"] == "ConfigError: num_samples=60000 is larger than the calibration pool"
    assert failures["cut/seed1"]["status"] == "running" and "interrupted" in failures["cut/seed1"]["error"]
    assert failures["torn"]["status"] == "unreadable"
    md = summary_md(tmp_path)
    assert "3 job(s) failed or did not finish" in md and "num_samples=60000 is larger" in md


def test_same_run_key_counts_once(tmp_path):
    write(tmp_path, "a/seed0", config(), 50.0, 90.0, run_key="k0")
    write(tmp_path, "b/seed0", config(), 52.0, 90.0, run_key="k0")  # the same job in another folder
    write(tmp_path, "c/seed1", config(seed=1), 60.0, 90.0, run_key="k1")
    summary, _ = report.build(tmp_path, plots=False)
    assert [c.n for c in summary.cells] == [2] and summary.cells[0].seeds == [0, 1]


def test_main_exit_codes_and_output(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert report.main([str(tmp_path)]) == 1
    write(tmp_path, "x/seed0", config(), 50.0, 90.0)
    out = tmp_path / "elsewhere"
    assert report.main([str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    assert (out / "summary.md").is_file() and not (out / "top1_vs_bits.png").exists()
    assert "1 jobs ok, 0 failed or unfinished, 1 configurations" in capsys.readouterr().out


def test_both_command_lines_rebuild_the_summary(tmp_path):
    write(tmp_path, "x/seed0", config(), 50.0, 90.0)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for cmd in (["-m", "calibbench.report"], ["-m", "calibbench", "report"]):
        (tmp_path / "summary.csv").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, *cmd, str(tmp_path), "--no-plots"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "summary.csv").is_file() and "summary.md" in proc.stdout


def test_aggregate_wandb_run_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from calibbench.config import LoggerConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    for seed in (0, 1):
        write(tmp_path, f"random/seed{seed}", config(seed=seed), 50.0 + seed, 90.0)
    for gamma in (1.0, 2.0):  # a key column mixing numbers (selectq) with absent values (random)
        write(tmp_path, f"selectq/g{gamma}", config("selectq", gamma=gamma), 55.0, 90.0)
    summary, files = report.build(tmp_path)
    assert "strategy.gamma" in summary.columns
    report.log_aggregate(summary, files, LoggerConfig(mode="offline"), "sweep-x")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_a_field_added_later_does_not_split_cells(tmp_path):
    old = config(seed=0)
    new = config(seed=1)
    new["quant"]["act_modules"] = None  # a schema field added after the first job ran: null = default
    write(tmp_path, "random/w4/seed0", old, 10.0, 50.0)
    write(tmp_path, "random/w4/seed1", new, 20.0, 52.0)
    report.build(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert len(rows) == 1 and rows[0]["n"] == "2" and "quant.act_modules" not in rows[0]


def test_eval_splits_never_share_a_cell_and_non_paper_defaults_are_labelled(tmp_path):
    for seed in range(2):
        for split in ("test", "val"):
            write(tmp_path, f"selectq/{split}/seed{seed}",
                  {**config("selectq", seed=seed, select="lowest"), "eval_split": split}, 50.0 + seed,
                  90.0, deviations=["select=lowest"])
        write(tmp_path, f"selectq_hi/seed{seed}", {**config("selectq", seed=seed, select="highest"),
                                                   "eval_split": "test"}, 40.0, 90.0, deviations=[])
    summary, _ = report.build(tmp_path, plots=False)
    assert sorted((summary.value(c, "eval_split"), c.n) for c in summary.cells) == [
        ("test", 2), ("test", 2), ("val", 2)]
    md = summary_md(tmp_path)
    assert "| selectq (select=lowest, not the paper's reading) | 50.50 ± 0.71 |" in md
    assert "| selectq (select=highest) | 40.00 ± 0.00 |" in md


def test_refine_options_split_kd_cells_but_never_pure_ptq_ones(tmp_path):
    # Two refine=none jobs that ran before and after the kd learning rate changed are one cell
    # (no refine.* option is read without refinement); kd jobs at two rates are two cells.
    for seed, lr in enumerate([1e-3, 1e-4]):
        cfg = config(seed=seed)
        cfg["refine"] = {"name": "none", "lr": lr}
        write(tmp_path, f"none/seed{seed}", cfg, 50.0 + seed, 90.0)
    for lr, seconds in ((1e-3, 30.0), (1e-4, 40.0)):
        cfg = config(seed=0)
        cfg["refine"] = {"name": "kd", "lr": lr}
        path = write(tmp_path, f"kd/lr{lr}", cfg, 60.0, 95.0)
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "timings": {"refine": seconds}}))
    report.build(tmp_path)
    rows = read_csv(tmp_path / "summary.csv")
    assert sorted((r["refine"], r["refine.lr"], r["n"], r["refine_s_mean"]) for r in rows) == \
        [("kd", "0.0001", "1", "40.0"), ("kd", "0.001", "1", "30.0"), ("none", "", "2", "")]
    assert "refine s/job" in summary_md(tmp_path)


def test_seeds_filter_pairs_cells_run_at_different_seed_counts(tmp_path, capsys):
    for seed, t1 in enumerate([10.0, 20.0, 30.0, 40.0, 50.0]):
        write(tmp_path, f"none/seed{seed}", config(seed=seed), t1, 90.0)
    summary, _ = report.build(tmp_path, plots=False, seeds=[0, 1, 2])
    assert [(c.seeds, c.top1_mean) for c in summary.cells] == [([0, 1, 2], 20.0)]
    out = tmp_path / "paired"
    assert report.main([str(tmp_path), "--seeds", "3,4", "--out", str(out), "--no-plots"]) == 0
    assert float(read_csv(out / "summary.csv")[0]["top1_mean"]) == 45.0
    assert report.main([str(tmp_path), "--seeds", "7", "--out", str(out), "--no-plots"]) == 1
    assert "at seeds 7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--seeds", "a,b"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_refined_and_calibration_only_rows_share_one_table(tmp_path):
    # random (none), random + kd and a generator strategy with its own refiner: one pivot table,
    # one row each, W3A3 and W4A4 columns; the kd learning rate shows only in the kd row.
    runs = [("random", "none", None, 40.0), ("random", "kd", 1e-4, 60.0), ("gdfq", "gdfq", 1e-4, 55.0)]
    for strategy, refine, lr, t1 in runs:
        for bits in (3, 4):
            cfg = config(strategy=strategy, bits=bits)
            cfg["refine"] = {"name": refine, **({"lr": lr} if lr else {})}
            write(tmp_path, f"{strategy}-{refine}/w{bits}", cfg, t1 + bits, 90.0)
    report.build(tmp_path, plots=False)
    md = summary_md(tmp_path)
    assert md.count("## Top-1:") == 1 and "refine=" not in md.split("## Top-1:")[1].splitlines()[0]
    assert "| random | 43.00 | 44.00 |" in md
    assert "| random + refine=kd | 63.00 | 64.00 |" in md
    assert "| gdfq + refine=gdfq | 58.00 | 59.00 |" in md


def test_a_budget_field_added_later_does_not_split_cells(tmp_path):
    # Jobs recorded before the budget gained gen_batch_size and a job recorded after, same budget
    # name: one cell. A field that differs among the records that have it still splits.
    write(tmp_path, "old/seed0", config(seed=0), 40.0, 90.0)
    cfg = config(seed=1)
    cfg["budget"]["gen_batch_size"] = 64
    write(tmp_path, "new/seed1", cfg, 50.0, 90.0)
    summary, _ = report.build(tmp_path, plots=False)
    assert [c.n for c in summary.cells] == [2] and "budget.gen_batch_size" not in summary.columns
    cfg = config(seed=2)
    cfg["budget"]["gen_batch_size"] = 16
    write(tmp_path, "new/seed2", cfg, 60.0, 90.0)
    summary, _ = report.build(tmp_path, plots=False)
    assert "budget.gen_batch_size" in summary.columns and len(summary.cells) == 3


def test_stage_seconds_are_averaged_per_configuration(tmp_path):
    for seed, (calib, refine) in enumerate([(10.0, 100.0), (30.0, 200.0)]):
        path = write(tmp_path, f"r/seed{seed}", config(seed=seed), 50.0, 90.0)
        record = json.loads(path.read_text())
        record["timings"] = {"calibration": calib, "refine": refine, "quant_eval": 5.0, "total": 1.0}
        path.write_text(json.dumps(record))
    summary, _ = report.build(tmp_path, plots=False)
    assert summary.cells[0].stage_s == {"calibration": 20.0, "refine": 150.0, "quant_eval": 5.0, "total": 1.0}
    md = summary_md(tmp_path)
    assert "## Stage seconds (mean per job)" in md
    assert "| random | W4A4 | 2 | 20.00 | 150.00 | 5.00 | 1.00 |" in md


def test_a_swept_refine_option_names_the_row_when_the_refiner_is_constant(tmp_path):
    # Every job is fdda + refine=fdda; only refine.lr varies: one pivot row per rate, none merged.
    for lr, t1 in ((5e-6, 90.0), (2e-5, 91.0)):
        cfg = config(strategy="fdda")
        cfg["refine"] = {"name": "fdda", "lr": lr}
        write(tmp_path, f"lr{lr}", cfg, t1, 99.0)
    report.build(tmp_path, plots=False)
    md = summary_md(tmp_path)
    assert "| fdda + refine=fdda (lr=5e-06) | 90.00 |" in md
    assert "| fdda + refine=fdda (lr=2e-05) | 91.00 |" in md


def test_paired_difference_to_random_with_bootstrap_interval(tmp_path):
    # selectq beats random by exactly 2 at every seed (a seed effect moves both): a zero-width
    # interval at +2 that excludes 0; zeroq is random ± symmetric noise: its interval holds 0.
    noise = [1.0, -1.0, 2.0, -2.0, 0.0]
    for seed in range(5):
        base = 50.0 + 5 * seed
        write(tmp_path, f"random/s{seed}", config("random", seed=seed), base, 90.0)
        write(tmp_path, f"selectq/s{seed}", config("selectq", seed=seed), base + 2.0, 90.0)
        write(tmp_path, f"zeroq/s{seed}", config("zeroq", seed=seed), base + noise[seed], 90.0)
    write(tmp_path, "dsg/s0", config("dsg", seed=0), 55.0, 90.0)  # one paired seed only
    report.build(tmp_path, plots=False)
    md = summary_md(tmp_path)
    assert "Paired Δ top-1 vs random" in md
    assert "| selectq | +2.00 [+2.00, +2.00] * |" in md
    zeroq = re.search(r"\| zeroq \| \+0\.00 \[(-\d+\.\d+), \+(\d+\.\d+)\] \|", md)
    assert zeroq and float(zeroq.group(1)) < 0 < float(zeroq.group(2))
    assert "| dsg | +5.00 (1 pair; the interval needs ≥ 2 paired seeds) |" in md
    rows = read_csv(tmp_path / "summary.csv")
    sq = row(rows, strategy="selectq")
    assert (sq["diff_random_mean"], sq["diff_random_low"], sq["diff_random_high"], sq["diff_random_n"]) == \
        ("2.0", "2.0", "2.0", "5")
    assert row(rows, strategy="dsg")["diff_random_low"] == "" and row(rows, strategy="random")["diff_random_n"] == ""


def test_pairs_only_at_the_same_bits_and_refinement(tmp_path):
    for seed in range(3):
        for bits in (3, 4):
            write(tmp_path, f"random/w{bits}/s{seed}", config("random", bits=bits, seed=seed), 40.0 + bits, 90.0)
        cfg = config("selectq", bits=3, seed=seed)
        cfg["refine"] = {"name": "kd", "lr": 1e-4}  # no random + kd in the folder: nothing to pair with
        write(tmp_path, f"selectq_kd/s{seed}", cfg, 60.0, 90.0)
        write(tmp_path, f"selectq/s{seed}", config("selectq", bits=4, seed=seed), 45.0, 90.0)
    report.build(tmp_path, plots=False)
    rows = read_csv(tmp_path / "summary.csv")
    assert row(rows, strategy="selectq", refine="kd")["diff_random_mean"] == ""
    assert row(rows, strategy="selectq", refine="none")["diff_random_mean"] == "1.0"  # 45 - 44 at W4A4


def test_variance_histogram_and_percentiles_within_random(tmp_path):
    for seed in range(25):  # random top-1 = 40, 41, ..., 64 (W3A3)
        write(tmp_path, f"random/s{seed}", config("random", bits=3, seed=seed), 40.0 + seed, 90.0)
    # selectq mean 60: 20 random seeds below and one tie (half) → (20 + 0.5) / 25 = 82nd percentile;
    # its seeds 59, 60, 61 → 19.5/25, 20.5/25, 21.5/25 = 78, 82, 86.
    for seed, t1 in enumerate([59.0, 60.0, 61.0]):
        write(tmp_path, f"selectq/s{seed}", config("selectq", bits=3, seed=seed), t1, 90.0)
    summary, files = report.build(tmp_path)
    md = summary_md(tmp_path)
    assert "### Random-calibration spread, W3A3" in md and "random over 25 seeds" in md
    assert "| selectq | 3 | 60.00 ± 1.00 | 82.0 | 78 82 86 |" in md
    assert any(p.name.startswith("variance_") and p.stat().st_size > 1000 for p in files)


def test_few_random_seeds_draw_no_variance_histogram(tmp_path):
    for seed in range(5):
        write(tmp_path, f"random/s{seed}", config("random", seed=seed), 40.0 + seed, 90.0)
        write(tmp_path, f"selectq/s{seed}", config("selectq", seed=seed), 45.0, 90.0)
    _, files = report.build(tmp_path)
    assert not any(p.name.startswith("variance_") for p in files)
    assert "Random-calibration spread" not in summary_md(tmp_path)


def _diagnostics(clip: list[float]) -> dict:
    return {"images": 10, "layers": [
        {"name": f"layer{i}", "kind": "activation", "bits": 3, "calib_lo": 0.0, "calib_hi": 4.0,
         "eval_min": 0.0, "eval_max": 5.0, "eval_p001": 0.0, "eval_p999": 3.0, "clip_rate": c,
         "range_inflation": 4.0 / 3.0, "snr_db": 10.0 - i, "act_quant_snr_db": 12.0}
        for i, c in enumerate(clip)]}


def test_diagnostics_of_a_sweep_are_plotted_side_by_side(tmp_path):
    from calibbench.report.plots import average_layers

    for strategy, clip in (("random", [0.01, 0.02]), ("selectq", [0.001, 0.0])):
        for seed in range(2):
            path = write(tmp_path, f"{strategy}/s{seed}", config(strategy, bits=3, seed=seed), 50.0, 90.0)
            (path.parent / "diagnostics.json").write_text(json.dumps(_diagnostics([c * (1 + seed) for c in clip])))
    write(tmp_path, "random/w4", config("random", bits=4), 80.0, 95.0)  # no diagnostics at W4A4
    _, files = report.build(tmp_path)
    figs = [p for p in files if p.name.startswith("diagnostics_")]
    assert len(figs) == 1 and "W3A3" in figs[0].name and figs[0].stat().st_size > 5000
    # mean over seeds, layer by layer: 0.01 and 0.02 → 0.015
    merged = average_layers([_diagnostics([0.01, 0.02]), _diagnostics([0.02, 0.04])])
    assert [round(layer["clip_rate"], 6) for layer in merged] == [0.015, 0.03]
    assert merged[1]["snr_db"] == 9.0 and merged[0]["name"] == "layer0"
