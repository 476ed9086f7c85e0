"""``run(cfg)``: build → FP eval → calibration set → quantize → calibrate → refine → eval → record.

One linear function that reads like the data flow; each stage is a call into the module that owns
it, timed, and failure handling wraps the whole run once (status and error go into the record).
"""

from __future__ import annotations

import json
import logging
import platform
import random
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from calibbench import __version__, datasets, models, quant, refine, strategies
from calibbench.cache import Cache, atomic_write_bytes, content_key
from calibbench.config import ConfigError, effective_bits, to_container, validate
from calibbench.evaluate import evaluate
from calibbench.tracking import tracker

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# Keys that change how a run is executed or logged, not what it computes.
_NOT_IN_RUN_KEY = ("logger", "progress", "resume", "threads", "paths")
_PACKAGES = ("torch", "torchvision", "pytorchcv", "hydra-core", "omegaconf", "lightning", "wandb", "numpy")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine; "
                          f"valid choices here: auto, cpu")
    return torch.device(name)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "calibbench": __version__}
    for pkg in _PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_key(cfg: DictConfig) -> str:
    """Hash of the resolved config minus logging/paths: equal keys compute the same result."""
    data = to_container(cfg)
    for key in _NOT_IN_RUN_KEY:
        data.pop(key, None)
    data["dataset"].pop("num_workers", None)
    return content_key(data)


def default_run_dir(cfg: DictConfig) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    return Path(cfg.paths.output_dir) / "runs" / f"{stamp}_{cfg.strategy.name}_{cfg.model.name}_w{cfg.bits}"


def load_complete(run_dir: Path, key: str) -> Optional[dict]:
    """The run dir's result when it is complete (status ok) and was computed for the same config."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if record.get("status") == "ok" and record.get("run_key") == key:
        return record
    return None


def write_record(run_dir: Path, record: dict) -> Path:
    path = run_dir / RESULT_FILE
    atomic_write_bytes(path, json.dumps(record, indent=2, default=float).encode())
    return path


class Timings(dict):
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 4)


def _fp_key(cfg: DictConfig, built: models.BuiltModel, data: datasets.DataModule, n_eval: int) -> dict:
    return {"arch": cfg.model.arch, "source": cfg.model.source, "weights": built.weights_id,
            "dataset": data.name, "mean": data.mean, "std": data.std, "input_size": data.input_size,
            "resize": cfg.dataset.resize, "eval_size": len(data.val), "n_eval": n_eval}  # type: ignore[arg-type]


def _calibration_key(cfg: DictConfig, strategy: strategies.Strategy, built: models.BuiltModel,
                     data: datasets.DataModule) -> dict:
    budget = {k: v for k, v in to_container(cfg.budget).items() if not k.startswith("eval_")}
    return {"strategy": to_container(cfg.strategy), "version": strategy.cache_version,
            "model": [cfg.model.arch, built.weights_id], "seed": cfg.seed, "num_samples": cfg.num_samples,
            "dataset": [data.name, data.mean, data.std, data.input_size, len(data.train)],  # type: ignore[arg-type]
            "budget": budget}


def run(cfg: DictConfig, run_dir: Optional[str | Path] = None, group: Optional[str] = None) -> dict:
    """Run one experiment and return its result record (also written to ``run_dir/result.json``).

    Raises after writing a ``status: failed`` record when anything goes wrong.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    key = run_key(cfg)
    if cfg.resume and (done := load_complete(run_dir, key)) is not None:
        log.info("complete result for this config already in %s: skipping", run_dir)
        return done
    record: dict[str, Any] = {
        "status": "running", "run_key": key, "run_dir": str(run_dir),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed, "config": to_container(cfg), "versions": versions(),
    }
    timings = Timings()
    try:
        validate(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(str(cfg.device))
        record["device"] = str(device)
        w_bits, a_bits = effective_bits(cfg)
        seed_everything(cfg.seed)
        cache = Cache(cfg.paths.cache_dir)
        tags = [cfg.model.name, f"W{w_bits}A{a_bits}", cfg.quant.name, cfg.budget.name]
        with tracker(cfg.logger, run_dir, run_dir.name, record["config"], cfg.strategy.name, tags,
                     group) as track:
            with timings.stage("model"):
                built = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir)
                model = built.module.to(device)
            with timings.stage("data"):
                data = datasets.build(cfg.dataset, cfg.model)
            eval_idx = datasets.spread_indices(len(data.val), cfg.budget.eval_limit)  # type: ignore[arg-type]
            with timings.stage("fp_eval"):
                fp, fp_hit, _ = cache.get_or_compute(
                    "fp_metrics", _fp_key(cfg, built, data, len(eval_idx)),
                    lambda: evaluate(model, data, device, cfg.budget.eval_batch_size, eval_idx,
                                     cfg.progress, "FP eval"))
            strategy = strategies.build(cfg.strategy)
            ctx = strategies.StrategyContext(model, data, device, cfg.seed, cfg.num_samples, cfg.budget,
                                             cfg.progress)
            with timings.stage("calibration"):
                calib, calib_hit, calib_key = cache.get_or_compute(
                    "calibration", _calibration_key(cfg, strategy, built, data),
                    lambda: strategy.calibration_set(ctx))
            if len(calib) != cfg.num_samples:
                raise RuntimeError(f"strategy {strategy.name!r} returned {len(calib)} images, "
                                   f"num_samples={cfg.num_samples}")
            with timings.stage("quantize"):
                qmodel = quant.quantize(model, cfg.quant, w_bits, a_bits).to(device)
            with timings.stage("calibrate"):
                quant.calibrate(qmodel, (x for x, _ in calib.batches(cfg.budget.calib_batch_size)), device)
            with timings.stage("refine"):
                refine_info = refine.run(qmodel, model, strategy, ctx, cfg.refine)
            with timings.stage("quant_eval"):
                q = evaluate(qmodel, data, device, cfg.budget.eval_batch_size, eval_idx, cfg.progress,
                             f"W{w_bits}A{a_bits} eval")
            info = dict(calib.info)
            record.update({
                "model": {"name": cfg.model.name, "arch": cfg.model.arch,
                          "weights_source": built.weights_source, "weights_id": built.weights_id},
                "dataset": {"name": data.name, "train_size": len(data.train),  # type: ignore[arg-type]
                            "eval_size": len(eval_idx)},
                "quant": {"preset": cfg.quant.name, "w_bits": w_bits, "a_bits": a_bits,
                          **quant.describe(qmodel)},
                "metrics": {"fp": fp, "quant": q, "drop_top1": fp["top1"] - q["top1"]},
                "calibration": {
                    "strategy": strategy.name, "synthetic": strategy.synthetic,
                    "num_samples": len(calib), "indices": info.pop("indices", None),
                    "images_seen": info.pop("images_seen", 0 if strategy.synthetic else len(calib)),
                    "cache_key": calib_key, "cache_hit": calib_hit, "fp_cache_hit": fp_hit,
                    "info": info},
                "refine": {"name": cfg.refine.name, **refine_info},
            })
            track.log({"fp/top1": fp["top1"], "quant/top1": q["top1"], "quant/top5": q["top5"]})
            track.summary({"fp_top1": fp["top1"], "quant_top1": q["top1"], "quant_top5": q["top5"],
                           "w_bits": w_bits, "a_bits": a_bits, **{f"time/{k}": v for k, v in timings.items()}})
            if strategy.synthetic and cfg.logger.log_images:
                preview = calib.images[:16] * torch.tensor(data.std).view(1, -1, 1, 1) \
                    + torch.tensor(data.mean).view(1, -1, 1, 1)
                track.images("calibration/preview", preview, f"{strategy.name} synthetic images")
        record["status"] = "ok"
    except BaseException as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        raise
    finally:
        record["timings"] = dict(timings, total=round(sum(timings.values()), 4))
        record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_record(run_dir, record)
    return record


def summary_rows(record: dict) -> list[tuple[str, str]]:
    """The short table the CLI prints for one run."""
    m, c, qz = record["metrics"], record["calibration"], record["quant"]
    rows = [("strategy", c["strategy"]), ("model", record["model"]["name"]),
            ("quant", f"{qz['preset']} W{qz['w_bits']}A{qz['a_bits']}"),
            ("calibration size", str(c["num_samples"])),
            ("FP top-1", f"{m['fp']['top1']:.2f}"), ("quant top-1", f"{m['quant']['top1']:.2f}"),
            ("quant top-5", f"{m['quant']['top5']:.2f}"), ("eval images", str(m["quant"]["n"]))]
    rows += [(f"time {k} (s)", f"{v:.2f}") for k, v in record["timings"].items()]
    return rows


