"""Loading and aggregation: every ``result.json`` under a folder → a job table → one row per cell.

Each job writes its own ``result.json`` and aggregation only ever globs a folder: Hydra's
``on_multirun_end`` receives no job results, and with remote launchers ``on_job_end`` runs on
another node (DESIGN.md pitfall 5).

A cell is one configuration across seeds. Its key always holds dataset, model, quantizer preset,
budget, split, calibration size, strategy and the effective weight/activation bits, plus every
other config field that varies in the folder (for a group such as ``strategy``: varies among jobs
with the same strategy name, e.g. ``strategy.num_centroids``). So presets, datasets or any swept
field are never averaged together; only seeds are. Failed or unfinished jobs are listed, not
dropped.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pandas as pd

from calibbench.record import DIAGNOSTICS_FILE, RESULT_FILE

log = logging.getLogger(__name__)

MISSING = "<missing>"  # a field a job's config lacks or leaves null (the default): one value
DEVIATIONS = "paper_deviations"  # flat key: the record's calibration.paper_deviations, joined
STRATEGY, REFINE = "strategy", "refine"
BITS = ("w_bits", "a_bits")
# The columns every table has, in order: (label, flattened config key).
BASE = (("dataset", "dataset.name"), ("model", "model.name"), ("quant", "quant.name"),
        ("budget", "budget.name"), ("split", "eval_split"), ("num_samples", "num_samples"),
        ("strategy", "strategy.name"))
# Config keys that never split a cell: how a job was run or logged, the seed (averaged over),
# bits / quant.w_bits / quant.a_bits (the effective w_bits and a_bits columns replace them),
# dataset.num_workers (DataLoader processes: same images, same numbers), and diagnostics (an extra
# measuring pass after evaluation; it changes no accuracy).
IGNORED_ROOTS = ("seed", "logger", "progress", "resume", "threads", "paths", "guard", "bits", "diagnostics",
                 DEVIATIONS)
IGNORED_KEYS = ("quant.w_bits", "quant.a_bits", "dataset.num_workers")
# Groups whose every field is a typed schema field fixed by the preset's name (``budget=cpu``): a
# field missing from an older record was added to the schema after that job ran, so its absence
# never splits a cell. Not so for strategy/refine, whose dict fields are absent when switched off.
SCHEMA_ONLY_ROOTS = ("budget", "dataset")  # a field absent from an older record predates it (dataset.family)
# Pipeline stages shown in the stage-time table, in run order (result.json ``timings``).
# The range estimator: an axis of every comparison. Its fields are a key (never averaged) and are
# part of a row's label rather than of the panel, so one table sets strategies and estimators side
# by side; a field is kept only where the run read it (percentile only with act_observer=percentile,
# ...), so identical computations are never split by an unused setting.
ESTIMATOR_FIELDS = ("quant.act_observer", "quant.weight_observer", "quant.observer_reduce",
                    "quant.percentile", "quant.mse_p", "quant.mse_steps", "quant.ema_decay",
                    "quant.pool_values")
ESTIMATING = ("percentile", "mse", "aciq")  # observers that honour observer_reduce
# What a record from before a field existed computed (observer_reduce and mse_p came with issue 20).
ESTIMATOR_LEGACY = {"quant.observer_reduce": "batch_mean", "quant.mse_p": 2.0}
STAGES = ("calibration", "calibrate", "refine", "quant_eval", "diagnostics", "total")
METRICS = ("fp_top1", "top1_mean", "top1_std", "top5_mean", "top5_std", "refine_s_mean")
_JOB_FIELDS = ("path", "status", "error", "run_key", "finished_at", "seed", "fp_top1", "top1", "top5")


def _hashable(value: Any) -> Any:
    """Lists and dicts (json_normalize leaves them as values) become JSON text; null is MISSING."""
    if value is None:
        return MISSING
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def flatten_config(config: dict) -> dict[str, Any]:
    """Dotted keys → hashable values. One record at a time: normalizing all records in one frame
    would turn an int column with a hole into floats (``bits`` 8 → 8.0)."""
    if not config:
        return {}
    flat = {str(k): _hashable(v) for k, v in pd.json_normalize(config, sep=".").iloc[0].to_dict().items()}
    if flat.get("refine.name", "none") == "none":
        # With refine=none no refine.* option is read: a learning rate changed in conf/refine/ after
        # pure-PTQ jobs ran must not split them from later ones, nor show as a column of theirs.
        flat = {k: v for k, v in flat.items() if not k.startswith("refine.") or k == "refine.name"}
    if flat.get("refine.name") != "plf":
        # refine.plf.* exists in every config (the schema's defaults) but only refine=plf reads it.
        flat = {k: v for k, v in flat.items() if not k.startswith("refine.plf.")}
    flat = _estimator_fields(flat)
    w, a, bits = flat.get("quant.w_bits", MISSING), flat.get("quant.a_bits", MISSING), flat.get("bits")
    flat["w_bits"] = bits if w == MISSING else w
    flat["a_bits"] = bits if a == MISSING else a
    return flat


def _estimator_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """Keep the estimator settings a run read, fill those an older record predates."""
    act, weight = flat.get("quant.act_observer"), flat.get("quant.weight_observer")
    if act is None and weight is None:
        return flat
    used = {"quant.act_observer", "quant.weight_observer"}
    if act in ESTIMATING:
        used |= {"quant.observer_reduce"}
        if flat.get("quant.observer_reduce", ESTIMATOR_LEGACY["quant.observer_reduce"]) == "pooled":
            used.add("quant.pool_values")
    if act == "percentile":
        used.add("quant.percentile")
    if "mse" in (act, weight):
        used |= {"quant.mse_p", "quant.mse_steps"}
    if act == "ema":
        used.add("quant.ema_decay")
    out = {k: v for k, v in flat.items() if k not in ESTIMATOR_FIELDS or k in used}
    for key, old in ESTIMATOR_LEGACY.items():
        if key in used and out.get(key, MISSING) == MISSING:
            out[key] = old
    return out


def _read(path: Path, root: Path) -> dict[str, Any]:
    """One job row: status, metrics, timings and the flattened config (prefixed ``cfg:``)."""
    job: dict[str, Any] = {"path": str(path.parent.relative_to(root))}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        return {**job, "status": "unreadable", "error": f"{type(err).__name__}: {err}"}
    flat = flatten_config(record.get("config") or {})
    if flat:
        flat[DEVIATIONS] = ", ".join((record.get("calibration") or {}).get(DEVIATIONS) or [])
    job.update(status=str(record.get("status", "unknown")), error=record.get("error"),
               run_key=record.get("run_key"), finished_at=str(record.get("finished_at") or ""),
               seed=record.get("seed", flat.get("seed")))
    metrics = record.get("metrics") or {}
    try:
        job.update(fp_top1=float(metrics["fp"]["top1"]), top1=float(metrics["quant"]["top1"]),
                   top5=float(metrics["quant"]["top5"]))
    except (KeyError, TypeError, ValueError):
        if job["status"] == "ok":  # claims success without the numbers: treat as broken, say so
            job.update(status="incomplete", error="status ok but metrics.fp/quant top1/top5 missing")
    timings = record.get("timings") or {}
    job.update({f"time:{k}": float(v) for k, v in timings.items() if isinstance(v, (int, float))})
    if job["status"] == "running":
        job["error"] = job.get("error") or \
            "no final status: the job was interrupted (rerun the sweep to resume it)"
    job["has_diagnostics"] = (path.parent / DIAGNOSTICS_FILE).is_file()
    job.update({f"cfg:{k}": v for k, v in flat.items()})
    return job


def load_jobs(root: Path) -> pd.DataFrame:
    """Every result.json under ``root`` (any depth), one row per configuration and seed.

    Two files with the same ``run_key`` (the same sweep launched into a folder twice with different
    subdir patterns) are one job: the newest complete one counts, so a cell's ``n`` is the number of
    distinct seeds and never a double count. Config columns are ``cfg:<dotted key>``; a key absent
    from a record is NaN there (told apart from null = MISSING for schema-only groups).
    """
    root = Path(root)
    rows = [_read(p, root) for p in sorted(root.rglob(RESULT_FILE)) if p.is_file()]
    jobs = pd.DataFrame(rows, dtype=object)
    for col in _JOB_FIELDS:
        if col not in jobs:
            jobs[col] = None
    for col in ("fp_top1", "top1", "top5"):
        jobs[col] = pd.to_numeric(jobs[col])
    jobs["ok"] = (jobs["status"] == "ok") & jobs["top1"].notna()
    if jobs.empty:
        return jobs
    keyed = jobs["run_key"].notna()
    newest = (jobs[keyed].sort_values(["ok", "finished_at"], kind="stable")
              .drop_duplicates("run_key", keep="last"))
    kept = pd.concat([newest, jobs[~keyed]]).sort_values("path", kind="stable")
    if len(kept) < len(jobs):
        log.warning("%d result files repeat a configuration already counted; kept the newest complete one",
                    len(jobs) - len(kept))
    return kept.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Aggregate


def sort_key(value: Any) -> tuple:
    """Orders mixed missing/number/text columns: numbers numerically, missing last."""
    if value is None or value == MISSING or (isinstance(value, float) and np.isnan(value)):
        return (2, 0, "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return (1, 0, str(value))
    return (0, value, "")


def varying_keys(config: pd.DataFrame) -> list[str]:
    """Config keys (beyond the base columns) whose value differs between jobs.

    A field of a named group (``strategy.gamma``) counts only when it differs among jobs that share
    the group's name: a selectq field is not "varying" merely because random lacks it, and
    ``model.arch`` does not become a column because two models are compared.
    """
    base = {k for _, k in BASE} | set(BITS)
    filled = config.fillna(MISSING)
    out = []
    for key in sorted(config.columns):
        root, _, rest = key.partition(".")
        if key in base or root in IGNORED_ROOTS or key in IGNORED_KEYS:
            continue
        name_key = f"{root}.name"
        if rest and rest != "name" and name_key in config:
            # A schema-only group's field absent from a record predates the field: no difference.
            part = filled[config[key].notna()] if root in SCHEMA_ONLY_ROOTS else filled
            varies = bool((part.groupby(name_key, sort=False)[key].nunique() > 1).any())
        else:
            varies = filled[key].nunique() > 1
        if varies:
            out.append(key)
    return out


def order_keys(extras: list[str]) -> list[str]:
    """Base columns with each group's varying fields right after it, then the rest, then bits."""
    keys: list[str] = []
    left = list(extras)
    for label, key in BASE:
        keys.append(key)
        mine = [k for k in left if k.startswith(f"{label}.")]
        keys += mine
        left = [k for k in left if k not in mine]
    return [*keys, *left, *BITS]


def label(key: str) -> str:
    return key[: -len(".name")] if key.endswith(".name") else key


def _none(value: Any) -> Optional[float]:
    return None if value is None or pd.isna(value) else float(value)


@dataclass
class Cell:
    """One row of the table (a view of :attr:`Summary.table`): a configuration over seeds."""

    key: tuple  # values for Summary.columns
    seeds: list[int]
    n_failed: int
    fp_top1: Optional[float]
    top1_mean: Optional[float]
    top1_std: Optional[float]  # sample std (n-1); None when n < 2
    top5_mean: Optional[float]
    top5_std: Optional[float]
    refine_s_mean: Optional[float]  # mean refinement seconds per job (None without refinement)
    flat: dict[str, Any]  # the config of one member (for fields that are constant in the table)
    stage_s: dict[str, float] = field(default_factory=dict)  # mean seconds per stage over ok jobs
    top1_by_seed: dict[Any, float] = field(default_factory=dict)  # the paired statistics' input
    job_paths: list[str] = field(default_factory=list)  # ok jobs, in seed order

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class Summary:
    root: Path
    columns: list[str]  # display labels of the key columns
    keys: list[str]  # the flattened config keys behind them
    table: pd.DataFrame  # one row per cell: key columns (labels), n, n_failed, seeds, metrics
    cells: list[Cell]
    failures: list[dict[str, Any]]  # one job row (load_jobs' columns) per job that is not ok
    n_ok: int

    def value(self, cell: Cell, column: str) -> Any:
        return cell.key[self.columns.index(column)]

    def header(self) -> list[str]:
        return [*self.columns, "n", "n_failed", "seeds", *METRICS]


def aggregate(jobs: pd.DataFrame, root: Path) -> Summary:
    """Group jobs into cells (mean ± sample std over seeds) and list every job that is not ok."""
    cfg_cols = [c for c in jobs.columns if str(c).startswith("cfg:")]
    if jobs.empty or not cfg_cols:
        keys = order_keys([])
        failures = _records(jobs[~jobs["ok"].astype(bool)]) if "ok" in jobs else []
        return Summary(Path(root), [label(k) for k in keys], keys,
                       pd.DataFrame(columns=[*map(label, keys), "n", "n_failed", "seeds", *METRICS]),
                       [], failures, 0)
    config = jobs[cfg_cols].rename(columns=lambda c: c[4:])
    has_config = config.notna().any(axis=1) if cfg_cols else pd.Series(False, index=jobs.index)
    keys = order_keys(varying_keys(config[has_config]))
    keyed = jobs[has_config].copy()
    for k in keys:
        keyed[f"key:{k}"] = config.loc[has_config, k].fillna(MISSING) if k in config else MISSING
    ok = keyed["ok"].astype(bool)
    for col in ("top1", "top5", "fp_top1"):
        keyed[col] = keyed[col].where(ok)  # failed jobs count in n_failed, never in a mean
    refined = keyed.get("cfg:refine.name", pd.Series("none", index=keyed.index)).fillna("none") != "none"
    keyed["refine_s"] = pd.to_numeric(keyed["time:refine"], errors="coerce").where(ok & refined) \
        if "time:refine" in keyed else np.nan
    stage_cols = [f"time:{st}" for st in STAGES if f"time:{st}" in keyed]
    for col in stage_cols:
        keyed[col] = pd.to_numeric(keyed[col], errors="coerce").where(ok)
    key_cols = [f"key:{k}" for k in keys]
    grouped = keyed.groupby(key_cols, sort=False, dropna=False)
    stats = grouped.agg(
        fp_top1=("fp_top1", "mean"), top1_mean=("top1", "mean"), top1_std=("top1", "std"),
        top5_mean=("top5", "mean"), top5_std=("top5", "std"), refine_s_mean=("refine_s", "mean"),
        n=("ok", "sum"), size=("ok", "size"), **{c: (c, "mean") for c in stage_cols})
    cells = []
    for (gkey, members), (_, row) in zip(grouped, stats.iterrows()):  # both in first-seen order
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        good = members[members["ok"].astype(bool)]
        good = good.iloc[sorted(range(len(good)), key=lambda i: sort_key(good["seed"].iloc[i]))]
        flat = {str(k)[4:]: v for k, v in members.iloc[0][cfg_cols].items() if not _isnan(v)}
        cells.append(Cell(
            tuple(gkey), list(good["seed"]), int(row["size"] - row["n"]), _none(row["fp_top1"]),
            _none(row["top1_mean"]), _none(row["top1_std"]), _none(row["top5_mean"]),
            _none(row["top5_std"]), _none(row["refine_s_mean"]), flat,
            {c[5:]: float(row[c]) for c in stage_cols if not pd.isna(row[c])},
            dict(zip(good["seed"], good["top1"].astype(float))), list(good["path"])))
    cells.sort(key=lambda c: tuple(sort_key(v) for v in c.key))
    columns = [label(k) for k in keys]
    table = pd.DataFrame(
        [[*c.key, c.n, c.n_failed, " ".join(map(str, c.seeds)),
          *(None if m is None else round(m, 4) for m in
            (c.fp_top1, c.top1_mean, c.top1_std, c.top5_mean, c.top5_std, c.refine_s_mean))]
         for c in cells], columns=[*columns, "n", "n_failed", "seeds", *METRICS], dtype=object)
    failures = _records(jobs[~jobs["ok"].astype(bool)])
    return Summary(Path(root), columns, keys, table, cells, failures, int(jobs["ok"].sum()))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows as dicts keyed by column name (``to_dict("records")`` with str keys)."""
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and np.isnan(value)


@functools.lru_cache(maxsize=4096)
def _read_json(path: str, mtime_ns: int) -> dict:
    """One parse per file version: the diagnostics table and the figures read the same files.
    Callers only read the result."""
    return json.loads(Path(path).read_text())


def load_diagnostics(root: Path, cell: Cell) -> Iterator[dict]:
    """The diagnostics.json of each ok job of ``cell`` that wrote one."""
    for rel in cell.job_paths:
        path = Path(root) / rel / DIAGNOSTICS_FILE
        if path.is_file():
            try:
                yield _read_json(str(path), path.stat().st_mtime_ns)
            except (OSError, ValueError):
                log.warning("unreadable %s: left out of the diagnostics table and plot", path)
