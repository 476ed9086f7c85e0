"""pipeline.run in-process at the smoke budget: the record, determinism, caching, resume, failures."""

import json
from pathlib import Path

import pytest
import torch

from calibbench.config import ConfigError
from calibbench.pipeline import run

SMOKE = ("budget=smoke", "num_samples=32")


@pytest.fixture
def smoke_cfg(compose, tmp_path):
    def _cfg(*overrides):
        return compose(*SMOKE, f"paths.output_dir={tmp_path / 'out'}", *overrides)

    return _cfg


def test_record_has_the_contract_fields(smoke_cfg, tmp_path):
    record = run(smoke_cfg(), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["status"] == record["status"] == "ok"
    m = on_disk["metrics"]
    for split in ("fp", "quant"):
        assert 0 <= m[split]["top1"] <= m[split]["top5"] <= 100 and m[split]["n"] == 200
    assert m["fp"]["top1"] > 70  # the pretrained model on real test images (88.41% on all 10k)
    cal = on_disk["calibration"]
    assert cal["num_samples"] == 32 and len(cal["indices"]) == 32 and cal["images_seen"] == 32
    assert on_disk["quant"]["preset"] == "dfq_legacy" and on_disk["quant"]["w_bits"] == 4
    assert {"model", "data", "fp_eval", "calibration", "quantize", "calibrate", "refine",
            "quant_eval", "total"} <= set(on_disk["timings"])
    assert on_disk["config"]["strategy"]["name"] == "random" and on_disk["seed"] == 0
    assert {"torch", "torchvision", "pytorchcv", "hydra-core", "python"} <= set(on_disk["versions"])
    assert len(on_disk["versions"]["calibbench_source"]) == 24  # content_key digest of the source
    assert on_disk["device"] == "cpu"
    # which CPU kernels computed the numbers (conftest pins AVX2 where the machine has it)
    assert on_disk["versions"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_same_seed_same_set_and_accuracy_without_cache(smoke_cfg, tmp_path):
    a = run(smoke_cfg("seed=3", f"paths.cache_dir={tmp_path / 'c1'}"), tmp_path / "a")
    b = run(smoke_cfg("seed=3", f"paths.cache_dir={tmp_path / 'c2'}"), tmp_path / "b")
    c = run(smoke_cfg("seed=4", f"paths.cache_dir={tmp_path / 'c2'}"), tmp_path / "c")
    assert not b["calibration"]["cache_hit"]
    assert a["calibration"]["indices"] == b["calibration"]["indices"] != c["calibration"]["indices"]
    assert a["metrics"]["quant"] == b["metrics"]["quant"]


def test_bits_sweep_reuses_calibration_set(smoke_cfg, tmp_path):
    first = run(smoke_cfg("bits=4"), tmp_path / "b4")
    second = run(smoke_cfg("bits=8"), tmp_path / "b8")
    assert not first["calibration"]["cache_hit"] and second["calibration"]["cache_hit"]
    assert second["calibration"]["indices"] == first["calibration"]["indices"]
    assert second["metrics"]["fp"] == first["metrics"]["fp"] and second["calibration"]["fp_cache_hit"]
    assert second["metrics"]["quant"]["top1"] >= first["metrics"]["quant"]["top1"] - 1e-9


def test_complete_run_is_skipped_on_rerun(smoke_cfg, tmp_path):
    first = run(smoke_cfg(), tmp_path / "run")
    mtime = (tmp_path / "run" / "result.json").stat().st_mtime_ns
    again = run(smoke_cfg(), tmp_path / "run")
    assert again == first and (tmp_path / "run" / "result.json").stat().st_mtime_ns == mtime
    changed = run(smoke_cfg("seed=1"), tmp_path / "run")  # another config in the same dir reruns
    assert changed["run_key"] != first["run_key"]


def test_failure_is_recorded_not_presented_as_success(smoke_cfg, tmp_path):
    with pytest.raises(ConfigError,
                       match="num_samples=60000 does not fit in the calibration pool.*val_size=5000.*leaving 45000"):
        run(smoke_cfg("num_samples=60000"), tmp_path / "bad")
    record = json.loads((tmp_path / "bad" / "result.json").read_text())
    assert record["status"] == "failed" and "num_samples=60000" in record["error"]
    assert "metrics" not in record


def test_wandb_offline_writes_run_files(smoke_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(smoke_cfg("logger.mode=offline"), tmp_path / "run")
    runs = list(Path(tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert record["status"] == "ok" and len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "the offline run has no .wandb file"
