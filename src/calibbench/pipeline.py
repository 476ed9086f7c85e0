"""``run(cfg)``: build → FP eval → calibration set → quantize → calibrate → refine → eval → record.

One linear function that reads like the data flow; each stage is a call into the module that owns
it, timed, and failure handling wraps the whole run once (status and error go into the record).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, cast

import torch
from omegaconf import DictConfig, OmegaConf

from calibbench import datasets, deploy, models, quant, refine, runtime, strategies
from calibbench.cache import Cache, atomic_write_bytes, content_key, source_digest
from calibbench.config import BudgetConfig, ConfigError, effective_bits, resolve_threads, to_container
from calibbench.evaluate import evaluate
from calibbench.preflight import preflight
from calibbench.quant.export import exact_integer, snap_bias
from calibbench.record import RESULT_FILE, versions
from calibbench.seeding import seed_everything
from calibbench.tracking import tracker

log = logging.getLogger(__name__)

# Keys that change how a run is executed or logged, not what it computes.
_NOT_IN_RUN_KEY = ("logger", "progress", "resume", "threads", "paths", "guard")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine; "
                          f"valid choices here: auto, cpu")
    return torch.device(name)


def run_key(cfg: DictConfig) -> str:
    """Hash of the resolved config minus logging/paths: equal keys compute the same result."""
    data = to_container(cfg)
    for key in _NOT_IN_RUN_KEY:
        data.pop(key, None)
    data["dataset"].pop("num_workers", None)
    data["budget"].pop("num_samples", None)  # only a default: its value is the top-level num_samples
    if data.get("export") is None:  # read only with export: a run without it keeps its old key
        data.pop("export_exact", None)
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


def _fp_key(cfg: DictConfig, built: models.BuiltModel, data: datasets.DataModule,
            eval_set: Any, eval_idx: list[int]) -> dict:
    """The FP metrics' key: the model, the data config, and a fingerprint of the evaluated files
    (names, sizes, modification times), so images changed in place are never served old metrics."""
    return {"arch": cfg.model.arch, "source": cfg.model.source, "weights": built.weights_id,
            "dataset": _dataset_key(cfg, data), "split": cfg.eval_split,
            "eval_indices": content_key(eval_idx), "n_eval": len(eval_idx),
            "eval_files": datasets.split_fingerprint(eval_set, eval_idx)}


def _dataset_key(cfg: DictConfig, data: datasets.DataModule) -> dict:
    """Everything about the data that changes pixels or which images exist, resolved."""
    spec = {k: v for k, v in to_container(cfg.dataset).items() if k not in ("num_workers", "download")}
    return {**spec, "mean": data.mean, "std": data.std, "input_size": data.input_size,
            "train_size": datasets.dataset_len(data.train), "test_size": datasets.dataset_len(data.test),
            "pool": content_key(data.pool.tolist())}


# Budget fields a strategy's calibration_set may not read: they are for evaluation and
# refinement only. Strategies see the budget without them (reading one fails), and everything
# they can read is in the cache key, so no budget change can leave a stale entry behind.
_BUDGET_NOT_FOR_CALIBRATION = ("eval_limit", "num_samples")  # num_samples: ctx.num_samples
_BUDGET_NOT_FOR_CALIBRATION_PREFIX = "refine_"


def calibration_budget(budget: DictConfig) -> BudgetConfig:
    """The budget as ``calibration_set`` sees it: a read-only, struct-mode copy without the
    evaluation/refinement fields (reading one raises an error naming the key)."""
    keep = [str(k) for k in budget if k not in _BUDGET_NOT_FOR_CALIBRATION
            and not str(k).startswith(_BUDGET_NOT_FOR_CALIBRATION_PREFIX)]
    view = OmegaConf.masked_copy(budget, keep)
    OmegaConf.set_struct(view, True)
    OmegaConf.set_readonly(view, True)
    return cast(BudgetConfig, view)  # a DictConfig on the budget schema, as StrategyContext.budget is


def calibration_key(cfg: DictConfig, strategy: strategies.Strategy, ctx: strategies.StrategyContext,
                    built: models.BuiltModel, data: datasets.DataModule) -> dict:
    """Every resolved value the calibration set depends on, plus the strategy's source code.

    ``ctx`` must carry :func:`calibration_budget`: the budget part of the key is exactly what the
    strategy can read. The source digest covers the strategy's module and every calibbench module
    it imports, so an algorithm change invalidates old entries without a version to bump.
    """
    return {"strategy": strategy.resolved_config(ctx),
            "source": source_digest([type(strategy).__module__]),
            "model": [cfg.model.source, cfg.model.arch, built.weights_id],
            "seed": cfg.seed, "num_samples": cfg.num_samples,
            "dataset": _dataset_key(cfg, data), "budget": to_container(ctx.budget),
            "pool_files": datasets.split_fingerprint(data.train, data.pool.tolist())}


def _check_pool(cfg: DictConfig, data: datasets.DataModule, resolved: dict) -> None:
    """The train split minus the validation split must hold num_samples and the selection pool."""
    n_pool, n_val = len(data.pool), len(data.holdout)
    for what, need in (("num_samples", cfg.num_samples), ("strategy pool_size", resolved.get("pool_size"))):
        if need is not None and need > n_pool:
            raise ConfigError(
                f"{what}={need} does not fit in the calibration pool: the train split has "
                f"{datasets.dataset_len(data.train)} images and dataset.val_size={n_val} of them are held out for "
                f"validation, leaving {n_pool}; lower dataset.val_size or {what}")


def _diagnostics_subset(cfg: DictConfig, data: datasets.DataModule) -> Optional[list[int]]:
    """The fixed evaluation subset of ``diagnostics=true`` (None when off). Drawn from the whole
    evaluation split (not ``budget.eval_limit``'s slice), so every budget shares it too."""
    diag = cfg.get("diagnostics")
    if diag is None or not diag.enabled:
        return None
    from calibbench import diagnostics

    _, split = data.eval_set(cfg.eval_split, None)
    diagnostics.check(diag, len(split), cfg.eval_split)
    return diagnostics.subset(split, int(diag.eval_images), int(diag.seed))


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
        strategy = preflight(cfg, run_dir)  # every option of the whole config, before any work
        if (threads := resolve_threads(cfg.threads)) is not None:
            torch.set_num_threads(threads)
        device = resolve_device(str(cfg.device))
        record["device"] = str(device)
        runtime.configure(device)
        if device.type == "cpu":  # the same seed gives the same numbers on the same kernel family
            record["versions"]["cpu_capability"] = runtime.cpu_capability()
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
            eval_set, eval_idx = data.eval_set(cfg.eval_split, cfg.budget.eval_limit)
            diag_idx = _diagnostics_subset(cfg, data)  # bad eval_images fails here, before any work
            ctx = strategies.StrategyContext(model, data, device, cfg.seed, cfg.num_samples, cfg.budget,
                                             cfg.progress, cfg.get("guard"))
            calib_ctx = replace(ctx, budget=calibration_budget(cfg.budget))
            calib_spec = calibration_key(cfg, strategy, calib_ctx, built, data)
            _check_pool(cfg, data, calib_spec["strategy"])
            with timings.stage("fp_eval"):
                fp, fp_hit, _ = cache.get_or_compute(
                    "fp_metrics", _fp_key(cfg, built, data, eval_set, eval_idx),
                    lambda: evaluate(model, data, device, cfg.budget.eval_batch_size, eval_idx,
                                     cfg.progress, "FP eval", eval_set))
            with timings.stage("calibration"):
                calib, calib_hit, calib_key = cache.get_or_compute(
                    "calibration", calib_spec, lambda: strategy.calibration_set(calib_ctx))
            if len(calib) != strategy.num_images(calib_ctx):
                raise RuntimeError(f"strategy {strategy.name!r} returned {len(calib)} images, "
                                   f"expected {strategy.num_images(calib_ctx)} (num_samples={cfg.num_samples})")
            with timings.stage("quantize"):
                qmodel = quant.quantize(model, cfg.quant, w_bits, a_bits).to(device)
            # Observers see the set in a seeded random order: class order (random) or rank order
            # (SelectQ) would bias order-dependent estimators (ema, per-batch percentile/mse/aciq).
            calib_order = torch.randperm(len(calib), generator=ctx.generator("calibrate/order"))
            with timings.stage("calibrate"):
                shuffled = calib.subset(calib_order)
                quant.calibrate(qmodel, (x for x, _ in shuffled.batches(cfg.budget.calib_batch_size)), device)
            with timings.stage("refine"):
                refine_info = refine.run(qmodel, model, strategy, ctx, calib, cfg.refine, track)
            snapped = integer_layers = None
            if cfg.export:  # evaluate the exported model (quant/export.py: snap_bias, exact_integer)
                with timings.stage("snap_bias"):
                    snapped = snap_bias(qmodel, calib.images[:1].to(device))
                    if cfg.export_exact:  # else the fused QDQ graph, close to the fake-quant model
                        integer_layers = exact_integer(qmodel, calib.images[:1].to(device))
            with timings.stage("quant_eval"):
                q = evaluate(qmodel, data, device, cfg.budget.eval_batch_size, eval_idx, cfg.progress,
                             f"W{w_bits}A{a_bits} eval", eval_set)
            if diag_idx is not None:
                from calibbench import diagnostics

                with timings.stage("diagnostics"):
                    record["diagnostics"] = diagnostics.run(
                        model, qmodel, data, eval_set, diag_idx, device, cfg.diagnostics, run_dir,
                        f"{strategy.name} seed {cfg.seed} W{w_bits}A{a_bits} {cfg.model.name}")
            info = dict(calib.info)
            record.update({
                "model": {"name": cfg.model.name, "arch": cfg.model.arch,
                          "weights_source": built.weights_source, "weights_id": built.weights_id},
                "dataset": {"name": data.name, "num_classes": data.num_classes,
                            "train_size": datasets.dataset_len(data.train),
                            "val_size": len(data.holdout), "pool_size": len(data.pool),
                            "eval_split": cfg.eval_split, "eval_size": len(eval_idx),
                            "transform": data.transform},
                "quant": {"preset": cfg.quant.name, "w_bits": w_bits, "a_bits": a_bits,
                          **quant.describe(qmodel)},
                "metrics": {"fp": fp, "quant": q, "drop_top1": fp["top1"] - q["top1"]},
                "calibration": {
                    "strategy": strategy.name, "synthetic": strategy.synthetic,
                    "num_samples": len(calib), "indices": info.pop("indices", None),
                    "images_seen": info.pop("images_seen", 0 if strategy.synthetic else len(calib)),
                    "cache_key": calib_key, "cache_hit": calib_hit, "fp_cache_hit": fp_hit,
                    "calibrate_order": calib_order.tolist(),
                    "paper_deviations": strategy.paper_deviations(),
                    "info": info},
                "refine": {"name": cfg.refine.name, **refine_info},
            })
            record["quant"]["int32_bias_layers"] = snapped
            record["quant"]["integer_layers"] = integer_layers
            with timings.stage("save_state"):
                record["quant_state"] = deploy.save_state(
                    qmodel, run_dir / deploy.STATE_FILE, deploy.state_meta(cfg, built.weights_id))
            if cfg.export:
                with timings.stage("export"):
                    batches = deploy.eval_batches(data, eval_set, eval_idx, cfg.budget.eval_batch_size)
                    record["export"] = {cfg.export: deploy.export_and_check(
                        qmodel, run_dir / deploy.ONNX_FILE, batches, cfg.export, cfg.threads)}
            # Every image the run looked at: selection or synthesis, plus refinement batches.
            record["images_seen"] = record["calibration"]["images_seen"] + refine_info["images_seen"]
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
        for name in (deploy.STATE_FILE, deploy.ONNX_FILE):  # nothing that looks like a shipped model
            (run_dir / name).unlink(missing_ok=True)
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


