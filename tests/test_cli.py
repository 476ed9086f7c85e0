"""The CLI as a user types it: end-to-end runs, multirun, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path, *args, multirun=False):
    cmd = [sys.executable, "-m", "calibbench", *(["-m"] if multirun else []),
           "logger.mode=disabled", "progress=false", f"paths.output_dir={tmp_path}", *args]
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def results(tmp_path):
    return [json.loads(p.read_text()) for p in Path(tmp_path).rglob("result.json")]


def test_default_experiment_end_to_end(tmp_path):
    proc = cli(tmp_path, "budget=smoke", "num_samples=32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("result.json") and Path(last).is_file()
    assert Path(last).is_relative_to(tmp_path / "runs")
    record = json.loads(Path(last).read_text())
    assert record["status"] == "ok" and record["config"]["bits"] == 4
    assert "FP top-1" in proc.stdout and "quant top-1" in proc.stdout


BAD = [
    (["strategy=nope"], ["nope", "random"]),
    (["model=nope"], ["nope", "resnet20_cifar10"]),
    (["dataset=nope"], ["nope", "cifar10_jpeg"]),
    (["quant=nope"], ["nope", "dfq_legacy", "academic"]),
    (["bits=abc"], ["abc"]),
    (["export_exact=fused"], ["export_exact=fused"]),
    (["bits=0"], ["bits=0", "2..16"]),
    (["bits=1"], ["bits=1", "2..16"]),
    (["bits=33"], ["bits=33", "2..16"]),
    (["num_samples=0"], ["num_samples=0"]),
    (["num_samples=50001"], ["num_samples=50001", "50000"]),
    (["device=cuda"], ["cuda", "not available", "cpu"]),
    (["device=tpu"], ["tpu", "auto, cpu, cuda"]),
    (["paths.data_dir=/nonexistent/data"], ["/nonexistent/data", "CALIBBENCH_DATA_DIR"]),
    (["model.weights=/nonexistent/w.pth"], ["/nonexistent/w.pth", "model.weights=pretrained"]),
    (["model=resnet20_cifar100", "dataset=cifar10_jpeg"], ["100 classes", "has 10"]),
    (["budget.eval_batch_size=0"], ["budget.eval_batch_size=0", ">= 1"]),
    (["budget.synth_iterations=-1"], ["budget.synth_iterations=-1", ">= 0"]),
    (["dataset.val_size=-1"], ["dataset.val_size=-1", ">= 0"]),
    (["dataset.val_size=49900", "num_samples=256"], ["dataset.val_size=49900", "num_samples=256", "leaving 100"]),
    (["seed=-3"], ["seed=-3", "0..4294967295"]),
    (["threads=0"], ["threads=0", "auto"]),
    (["strategy=zeroq", "budget.synth_iterations=0"], ["budget.synth_iterations=0", "strategy=zeroq"]),
    (["dataset.val_size=50000"], ["dataset.val_size=50000", "50000 images"]),
    (["eval_split=train"], ["eval_split", "'train'", "test, val"]),
    (["eval_split=val", "dataset.val_size=0"], ["eval_split=val", "dataset.val_size=0"]),
    (["strategy=selectq", "strategy.update_batch_size=0"], ["strategy.update_batch_size=0"]),
]


# Names that Hydra itself rejects while composing (unknown group option, a value of the wrong type).
COMPOSE_ERRORS = {"strategy=nope", "model=nope", "dataset=nope", "quant=nope", "bits=abc", "export_exact=fused"}


@pytest.mark.parametrize(("args", "needles"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_fails_clearly(compose, tmp_path, args, needles):
    """In-process (the fast lane): the composed config through ``pipeline.run``, which is what the
    CLI calls; the CLI turns the ConfigError into ``error: ...`` and exit 2 (the subprocess test
    below checks that wrapping on three representative rows)."""
    from calibbench.config import ConfigError
    from calibbench.pipeline import run

    if COMPOSE_ERRORS & set(args):
        with pytest.raises(Exception) as err:  # noqa: B017 - Hydra's error types vary by case
            compose("budget=smoke", *args)
    else:
        cfg = compose("budget=smoke", *args, f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
        with pytest.raises(ConfigError) as err:
            run(cfg, tmp_path / "run")
    out = str(err.value)
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"
    assert all(r["status"] != "ok" for r in results(tmp_path))


@pytest.mark.parametrize("args", [["quant=nope"], ["bits=0"], ["paths.data_dir=/nonexistent/data"]],
                         ids=["compose", "preflight", "data"])
def test_bad_input_exits_non_zero_without_traceback(tmp_path, args):
    """The CLI's side of the table above, for one row of each kind (Hydra's composition, the
    preflight, a check that needs the data)."""
    needles = dict((" ".join(a), n) for a, n in BAD)[" ".join(args)]
    proc = cli(tmp_path, "budget=smoke", *args)
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert all(r["status"] != "ok" for r in results(tmp_path))


def test_unknown_strategy_lists_only_real_options(tmp_path):
    proc = cli(tmp_path, "strategy=nope")
    assert proc.returncode != 0
    listed = proc.stderr.split("Available options in 'strategy':", 1)[1].split("Config search path")[0].split()
    assert {"random", "selectq", "zeroq", "dsg"} <= set(listed)
    assert not [name for name in listed if name.startswith("base_")]  # schemas are not choices
