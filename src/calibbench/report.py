"""Sweep aggregation: every ``result.json`` under a folder → summary.csv, summary.md, plots, W&B.

Each job writes its own ``result.json`` and aggregation only ever globs a folder: Hydra's
``on_multirun_end`` receives no job results, and with remote launchers ``on_job_end`` runs on
another node (DESIGN.md pitfall 5). The same code therefore serves the end-of-sweep callback
(:class:`AggregateCallback`) and ``python -m calibbench.report <dir>`` (rebuild at any time, also
for a sweep that was interrupted or spread over several launches).

A table cell is one configuration across seeds. Its key always holds dataset, model, quantizer
preset, budget, calibration size, strategy and the effective weight/activation bits, plus every
other config field that varies in the folder (for a group such as ``strategy``: varies among jobs
with the same strategy name, e.g. ``strategy.num_centroids``). So presets, datasets or any swept
field are never averaged together; only seeds are. Failed or unfinished jobs are listed, not dropped.

Heavy imports (matplotlib, wandb, torch via the atomic writer) happen inside the functions that
need them: Hydra instantiates the callback at the start of every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

_DEVIATIONS = "paper_deviations"  # flat key: the record's calibration.paper_deviations, joined
RESULT_FILE = "result.json"  # pipeline.RESULT_FILE; not imported, the pipeline pulls in torch models
SUMMARY_CSV, SUMMARY_MD, FAILURES_CSV = "summary.csv", "summary.md", "failures.csv"

# Config keys that never split a cell: how a job was run or logged, the seed (averaged over), and
# bits / quant.w_bits / quant.a_bits, which the effective w_bits and a_bits columns replace, and
# dataset.num_workers (DataLoader processes: same images, same order, same numbers).
_IGNORED_ROOTS = ("seed", "logger", "progress", "resume", "threads", "paths", "bits", _DEVIATIONS)
_IGNORED_KEYS = ("quant.w_bits", "quant.a_bits", "dataset.num_workers")
# Groups whose every field is a typed schema field fixed by the preset's name (``budget=cpu``): a
# field missing from an older record was added to the schema after that job ran, so its absence
# never splits a cell (e.g. ``budget.gen_batch_size`` beside pre-generator jobs). Not so for
# strategy/refine, whose dict fields (``refine.losses.ce``) are absent when switched off.
_SCHEMA_ONLY_ROOTS = ("budget",)
# The columns every table has, in order: (label, flattened config key).
_BASE = (("dataset", "dataset.name"), ("model", "model.name"), ("quant", "quant.name"),
         ("budget", "budget.name"), ("split", "eval_split"), ("num_samples", "num_samples"),
         ("strategy", "strategy.name"))
_BITS = ("w_bits", "a_bits")
# Pipeline stages shown in the stage-time table, in run order (result.json ``timings``).
_STAGES = ("calibration", "calibrate", "refine", "quant_eval", "total")
_STRATEGY = "strategy"
_REFINE = "refine"
_MISSING = "<missing>"  # a field a job's config lacks (another strategy's option)


def _get(flat: dict, key: str) -> Any:
    """A job's value for ``key``; ``null`` and absent are the same ("the default"): a field added
    to a schema after some jobs ran must not split their results into separate cells."""
    value = flat.get(key)
    return _MISSING if value is None else value
_METRICS = ("fp_top1", "top1_mean", "top1_std", "top5_mean", "top5_std", "refine_s_mean")


# ---------------------------------------------------------------------------------------------
# Collect


@dataclass
class Job:
    """One result.json, reduced to what the tables need."""

    path: Path  # job dir relative to the report root
    status: str  # ok | failed | running (interrupted) | unreadable
    error: Optional[str] = None
    run_key: Optional[str] = None
    finished_at: str = ""
    seed: Optional[int] = None
    flat: dict[str, Any] = field(default_factory=dict)  # flattened resolved config
    fp_top1: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    refine_s: Optional[float] = None  # timings.refine; never cached, so comparable across jobs
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pipeline stage

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.top1 is not None


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys → hashable values (lists become JSON text) so configs can be compared."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _inactive_refine_dropped(flat: dict[str, Any]) -> dict[str, Any]:
    """With ``refine=none`` no ``refine.*`` option is read: a learning rate changed in
    conf/refine/ after pure-PTQ jobs ran must not split them from later ones, nor show as a column
    of theirs."""
    if flat.get("refine.name", "none") != "none":
        return flat
    return {k: v for k, v in flat.items() if not k.startswith("refine.") or k == "refine.name"}


def _effective_bits(flat: dict[str, Any]) -> tuple[Any, Any]:
    w, a = flat.get("quant.w_bits"), flat.get("quant.a_bits")
    bits = flat.get("bits")
    return (bits if w is None else w), (bits if a is None else a)


def _read_job(path: Path, root: Path) -> Job:
    rel = path.parent.relative_to(root)
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        return Job(rel, "unreadable", error=f"{type(err).__name__}: {err}")
    flat = _inactive_refine_dropped(_flatten(record.get("config") or {}))
    flat["w_bits"], flat["a_bits"] = _effective_bits(flat)
    flat[_DEVIATIONS] = ", ".join((record.get("calibration") or {}).get(_DEVIATIONS) or [])
    job = Job(rel, str(record.get("status", "unknown")), record.get("error"), record.get("run_key"),
              str(record.get("finished_at") or ""), record.get("seed", flat.get("seed")), flat)
    metrics = record.get("metrics") or {}
    try:
        job.fp_top1 = float(metrics["fp"]["top1"])
        job.top1, job.top5 = float(metrics["quant"]["top1"]), float(metrics["quant"]["top5"])
    except (KeyError, TypeError, ValueError):
        if job.status == "ok":  # claims success without the numbers: treat as broken, say so
            job.status, job.error = "incomplete", "status ok but metrics.fp/quant top1/top5 missing"
    timings = record.get("timings") or {}
    job.timings = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    refine_s = timings.get("refine")
    if flat.get("refine.name", "none") != "none" and isinstance(refine_s, (int, float)):
        job.refine_s = float(refine_s)
    if job.status == "running":
        job.error = job.error or "no final status: the job was interrupted (rerun the sweep to resume it)"
    return job


def collect(root: Path) -> list[Job]:
    """Every result.json under ``root`` (any depth), one Job per configuration.

    Two files with the same ``run_key`` (e.g. the same sweep launched into a folder twice with
    different subdir patterns) are one configuration: the newest complete one counts, so a cell's
    ``n`` is the number of distinct seeds and never a double count.
    """
    root = Path(root)
    jobs = [_read_job(p, root) for p in sorted(root.rglob(RESULT_FILE)) if p.is_file()]
    best: dict[str, Job] = {}
    rest: list[Job] = []
    for job in jobs:
        if job.run_key is None:
            rest.append(job)
            continue
        other = best.get(job.run_key)
        if other is None or (job.ok, job.finished_at) > (other.ok, other.finished_at):
            best[job.run_key] = job
    if len(best) + len(rest) < len(jobs):
        log.warning("%d result files repeat a configuration already counted; kept the newest complete one",
                    len(jobs) - len(best) - len(rest))
    return sorted([*best.values(), *rest], key=lambda j: str(j.path))


# ---------------------------------------------------------------------------------------------
# Aggregate


@dataclass
class Cell:
    """One row of the table: a configuration and its statistics over seeds."""

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

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class Summary:
    root: Path
    columns: list[str]  # display labels of the key columns
    keys: list[str]  # the flattened config keys behind them
    cells: list[Cell]
    failures: list[Job]
    n_ok: int

    def value(self, cell: Cell, label: str) -> Any:
        return cell.key[self.columns.index(label)]

    def header(self) -> list[str]:
        return [*self.columns, "n", "n_failed", "seeds", *_METRICS]

    def rows(self) -> list[list[Any]]:
        """The table as plain values (CSV and W&B): None where nothing was measured."""
        out = []
        for c in self.cells:
            metrics = [c.fp_top1, c.top1_mean, c.top1_std, c.top5_mean, c.top5_std, c.refine_s_mean]
            out.append([*c.key, c.n, c.n_failed, " ".join(map(str, c.seeds)),
                        *(None if m is None else round(m, 4) for m in metrics)])
        return out


def _label(key: str) -> str:
    return key[: -len(".name")] if key.endswith(".name") else key


def _varying_keys(jobs: list[Job]) -> list[str]:
    """Config keys (beyond the base columns) whose value differs between jobs.

    A field of a named group (``strategy.gamma``) counts only when it differs among jobs that
    share the group's name: a selectq field is not "varying" merely because random lacks it,
    and ``model.arch`` does not become a column because two models are compared.
    """
    flats = [j.flat for j in jobs]
    all_keys = sorted({k for f in flats for k in f})
    base = {k for _, k in _BASE} | set(_BITS)
    out = []
    for key in all_keys:
        root, _, rest = key.partition(".")
        if key in base or root in _IGNORED_ROOTS or key in _IGNORED_KEYS:
            continue
        name_key = f"{root}.name"
        if rest and rest != "name" and name_key in all_keys:
            seen: dict[Any, set] = defaultdict(set)
            for f in flats:
                if root in _SCHEMA_ONLY_ROOTS and key not in f:
                    continue  # the record predates this field of the named preset: not a difference
                seen[_get(f, name_key)].add(_get(f, key))
            varies = any(len(v) > 1 for v in seen.values())
        else:
            varies = len({_get(f, key) for f in flats}) > 1
        if varies:
            out.append(key)
    return out


def _order_keys(extras: list[str]) -> list[str]:
    """Base columns with each group's varying fields right after it, then the rest, then bits."""
    keys: list[str] = []
    left = list(extras)
    for label, key in _BASE:
        keys.append(key)
        mine = [k for k in left if k.startswith(f"{label}.")]
        keys += mine
        left = [k for k in left if k not in mine]
    return [*keys, *left, *_BITS]


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _sort_key(value: Any) -> tuple:
    """Orders mixed None/number/text columns: numbers numerically, None last."""
    if value is None or value == _MISSING:
        return (2, 0, "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (1, 0, str(value))
    return (0, value, "")


def aggregate(jobs: list[Job], root: Path) -> Summary:
    """Group jobs into cells (mean ± std over seeds) and list every job that is not ok."""
    keyed = [j for j in jobs if j.flat]
    keys = _order_keys(_varying_keys(keyed))
    groups: dict[tuple, list[Job]] = defaultdict(list)
    for job in keyed:
        groups[tuple(_get(job.flat, k) for k in keys)].append(job)
    cells = []
    for key, members in groups.items():
        ok = sorted((j for j in members if j.ok), key=lambda j: _sort_key(j.seed))
        t1, t5 = _mean_std([j.top1 for j in ok]), _mean_std([j.top5 for j in ok])  # type: ignore[misc]
        fp = _mean_std([j.fp_top1 for j in ok if j.fp_top1 is not None])[0]  # type: ignore[misc]
        refine_s = [j.refine_s for j in ok if j.refine_s is not None]
        stages = {st: statistics.fmean(vals) for st in _STAGES
                  if (vals := [j.timings[st] for j in ok if st in j.timings])}
        cells.append(Cell(key, [j.seed for j in ok], len(members) - len(ok), fp, t1[0], t1[1],
                          t5[0], t5[1], statistics.fmean(refine_s) if refine_s else None,
                          members[0].flat, stages))
    cells.sort(key=lambda c: tuple(_sort_key(v) for v in c.key))
    failures = [j for j in jobs if not j.ok]
    return Summary(Path(root), [_label(k) for k in keys], keys, cells, failures,
                   sum(j.ok for j in jobs))


# ---------------------------------------------------------------------------------------------
# Views shared by the Markdown pivot and the plots


def _in_group(label: str, group: str) -> bool:
    return label == group or label.startswith(f"{group}.")


def _panel_labels(summary: Summary) -> list[str]:
    """Key columns that define one comparison panel: everything but the row (strategy and refine,
    with their swept fields) and the bits. Refinement is part of the row so that ``random`` and
    ``random + refine=kd`` (and a generator strategy with its own refinement) sit in one table."""
    return [c for c in summary.columns if c not in _BITS
            and not any(_in_group(c, g) for g in (_STRATEGY, _REFINE))]


def _strategy_labels(summary: Summary) -> list[str]:
    return [c for c in summary.columns if _in_group(c, _STRATEGY)]


def _refine_labels(summary: Summary) -> list[str]:
    return [c for c in summary.columns if _in_group(c, _REFINE)]


def _variant(summary: Summary, cell: Cell) -> str:
    """'selectq (num_centroids=5, gamma=1.0)': the strategy and its swept fields; a setting that
    departs from the paper's reading is named as such: 'selectq (select=lowest, not the paper's
    reading)'."""
    name, *fields = _strategy_labels(summary)
    opts = [f"{f.split('.', 1)[1]}={summary.value(cell, f)}" for f in fields
            if summary.value(cell, f) != _MISSING]
    for dev in filter(None, str(cell.flat.get(_DEVIATIONS) or "").split(", ")):
        note = f"{dev}, not the paper's reading"
        opts = [note if o == dev else o for o in opts] if dev in opts else [*opts, note]
    label = f"{summary.value(cell, name)}" + (f" ({', '.join(opts)})" if opts else "")
    refine = _refine_labels(summary)
    # The refiner's name is a column only when it varies; a swept refine option (refine.lr) must
    # still name the row, or cells at different rates would share one.
    name_r = summary.value(cell, _REFINE) if _REFINE in refine else cell.flat.get("refine.name", "none")
    if refine and name_r not in ("none", _MISSING, None):
        r_opts = [f"{f.split('.', 1)[1]}={summary.value(cell, f)}" for f in refine
                  if f != _REFINE and summary.value(cell, f) != _MISSING]
        label += f" + refine={name_r}" + (f" ({', '.join(r_opts)})" if r_opts else "")
    return label


def _bits_label(cell_w: Any, cell_a: Any) -> str:
    return f"W{cell_w}A{cell_a}"


def _row_order(summary: Summary, cell: Cell) -> tuple:
    """Within a panel: by strategy (and its fields), the calibration-only row first, then the
    refined ones."""
    strategy = tuple(_sort_key(summary.value(cell, c)) for c in _strategy_labels(summary))
    refine = summary.value(cell, _REFINE) if _REFINE in summary.columns else "none"
    rest = tuple(_sort_key(v) for v in cell.key)
    return (*strategy, refine not in ("none", _MISSING), rest)


def _panels(summary: Summary) -> dict[tuple, list[Cell]]:
    labels = _panel_labels(summary)
    out: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in sorted(summary.cells, key=lambda c: _row_order(summary, c)):
        out[tuple(summary.value(cell, c) for c in labels)].append(cell)
    return out


def _panel_title(summary: Summary, panel: tuple) -> str:
    parts = []
    for label, value in zip(_panel_labels(summary), panel):
        if label == "budget":
            parts.append(f"budget {value}")
        elif label == "num_samples":
            parts.append(f"{value} samples")
        elif label in ("dataset", "model", "quant"):
            parts.append(str(value))
        else:
            parts.append(f"{label}={value}")
    return " · ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:120]


# ---------------------------------------------------------------------------------------------
# Files


def _fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _md_cell(text: Any) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return lines


def _counts(summary: Summary) -> str:
    return (f"{summary.n_ok} jobs ok, {len(summary.failures)} failed or unfinished, "
            f"{len(summary.cells)} configurations")


def _first_line(error: Optional[str], limit: int = 300) -> str:
    text = (error or "").strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _failure_fields(job: Job) -> list[Any]:
    f = job.flat
    return [str(job.path), job.status, f.get("strategy.name"), f.get("model.name"),
            f.get("w_bits"), f.get("a_bits"), job.seed, _first_line(job.error)]


_FAILURE_HEADER = ["job", "status", "strategy", "model", "w_bits", "a_bits", "seed", "error"]


def markdown(summary: Summary, plots: Sequence[Path] = ()) -> str:
    """summary.md: one pivot (strategy × bits) per panel, the full table, failures, plots."""
    n_fail = len(summary.failures)
    lines = [f"# Sweep summary: {summary.root.name}", "",
             f"{_counts(summary)}. "
             "Top-1/top-5 accuracy in %, mean ± sample std over seeds (n seeds; no ± when n = 1); "
             "FP = the full-precision model on the same evaluation images.", ""]
    if n_fail:
        lines += [f"**{n_fail} job(s) failed or did not finish — see [Failed jobs](#failed-jobs).**", ""]
    for panel, cells in _panels(summary).items():
        bits = sorted({(summary.value(c, "w_bits"), summary.value(c, "a_bits")) for c in cells},
                      key=lambda b: (_sort_key(b[0]), _sort_key(b[1])))
        variants: dict[str, dict[tuple, Cell]] = defaultdict(dict)
        for c in cells:
            variants[_variant(summary, c)][(summary.value(c, "w_bits"), summary.value(c, "a_bits"))] = c
        fps = [c.fp_top1 for c in cells if c.fp_top1 is not None]
        rows = []
        for name, by_bits in variants.items():
            row: list[Any] = [name]
            for b in bits:
                c = by_bits.get(b)
                text = "" if c is None else _fmt(c.top1_mean, c.top1_std)
                if c is not None and c.n_failed:
                    text += f" ({c.n_failed} failed)"
                row.append(text.strip())
            rows.append(row)
        lines += [f"## Top-1: {_panel_title(summary, panel)}", ""]
        if fps:
            lines += [f"FP top-1: {_fmt(statistics.fmean(fps))}", ""]
        lines += _md_table(["strategy", *(_bits_label(*b) for b in bits)], rows) + [""]
    lines += ["## All configurations", ""]
    refined = any(c.refine_s_mean is not None for c in summary.cells)
    header = [*summary.columns, "n", "seeds", "FP top-1", "top-1", "top-5",
              *(["refine s/job"] if refined else []), "failed"]
    lines += _md_table(header, ([*("" if v == _MISSING else v for v in c.key), c.n,
                                 " ".join(map(str, c.seeds)), _fmt(c.fp_top1),
                                 _fmt(c.top1_mean, c.top1_std), _fmt(c.top5_mean, c.top5_std),
                                 *([_fmt(c.refine_s_mean)] if refined else []),
                                 c.n_failed or ""] for c in summary.cells)) + [""]
    lines += _stage_table(summary)
    lines += ["## Failed jobs", ""]
    if summary.failures:
        lines += _md_table(_FAILURE_HEADER, (_failure_fields(j) for j in summary.failures)) + [""]
    else:
        lines += ["None.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _stage_table(summary: Summary) -> list[str]:
    """Mean wall seconds per stage and job, per configuration (what each method costs where).

    ``calibration`` is near 0 where a job took its set from the cache (e.g. the second bit-width
    of a sweep); jobs that ran side by side share the cores, so compare within a sweep."""
    stages = [st for st in _STAGES if any(st in c.stage_s for c in summary.cells)]
    if not stages:
        return []
    panel_labels = [c for c in _panel_labels(summary) if c in ("model", "dataset")]
    header = [*panel_labels, "strategy", "bits", "n", *(f"{st} s" for st in stages)]
    rows = []
    for panel, cells in _panels(summary).items():
        for c in cells:
            rows.append([*(summary.value(c, p) for p in panel_labels), _variant(summary, c),
                         _bits_label(summary.value(c, "w_bits"), summary.value(c, "a_bits")), c.n,
                         *(_fmt(c.stage_s.get(st)) for st in stages)])
    return (["## Stage seconds (mean per job)", "",
             "`calibration` ≈ 0 where the set came from the cache; jobs that ran in parallel shared "
             "the cores.", ""] + _md_table(header, rows) + [""])


def _csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or v == _MISSING else v for v in row])
    return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    from calibbench.cache import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _save(fig: Any, path: Path) -> Path:
    """Render through a temp file so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_bits(summary: Summary, out_dir: Path) -> list[Path]:
    """Top-1 vs bits, one line per strategy variant with ±std error bars, FP dashed; one PNG per panel."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any process

    panels = _panels(summary)
    paths = []
    for panel, cells in panels.items():
        measured = [c for c in cells if c.top1_mean is not None]
        if not measured:
            continue
        same = all(summary.value(c, "w_bits") == summary.value(c, "a_bits") for c in measured)
        ticks = sorted({(summary.value(c, "w_bits"), summary.value(c, "a_bits")) for c in measured},
                       key=lambda b: (_sort_key(b[0]), _sort_key(b[1])))
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        variants: dict[str, list[Cell]] = defaultdict(list)
        for c in measured:
            variants[_variant(summary, c)].append(c)
        for name, vc in variants.items():
            vc.sort(key=lambda c: ticks.index((summary.value(c, "w_bits"), summary.value(c, "a_bits"))))
            xs = [summary.value(c, "w_bits") if same else
                  ticks.index((summary.value(c, "w_bits"), summary.value(c, "a_bits"))) for c in vc]
            ax.errorbar(xs, [c.top1_mean for c in vc], yerr=[c.top1_std or 0.0 for c in vc],
                        marker="o", capsize=3, label=name)
        fps = [c.fp_top1 for c in measured if c.fp_top1 is not None]
        if fps:
            ax.axhline(statistics.fmean(fps), linestyle="--", color="gray", label="FP")
        if same:
            ax.set_xticks([b[0] for b in ticks])
            ax.set_xlabel("bits (weights = activations)")
        else:
            ax.set_xticks(range(len(ticks)), [_bits_label(*b) for b in ticks])
            ax.set_xlabel("bits")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(_panel_title(summary, panel), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        name = "top1_vs_bits" if len(panels) == 1 else f"top1_vs_bits_{_slug(_panel_title(summary, panel))}"
        paths.append(_save(fig, out_dir / f"{name}.png"))
    return paths


_HEAT_ROW, _HEAT_COL = "strategy.num_centroids", "strategy.gamma"


def plot_selectq_heatmap(summary: Summary, out_dir: Path) -> list[Path]:
    """SelectQ mean top-1 over num_centroids × gamma, one subplot per bit-width.

    Drawn only when the folder sweeps at least one of the two fields for selectq; one figure per
    panel and per combination of SelectQ's other swept fields, so cells are never mixed.
    """
    from matplotlib.figure import Figure

    swept = {_HEAT_ROW, _HEAT_COL} & set(summary.columns)
    cells = [c for c in summary.cells if summary.value(c, _STRATEGY) == "selectq" and c.top1_mean is not None]
    if not swept or not cells:
        return []
    others = [c for c in [*_strategy_labels(summary)[1:], *_refine_labels(summary)]
              if c not in (_HEAT_ROW, _HEAT_COL)]
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(*(summary.value(c, p) for p in _panel_labels(summary)),
                *(summary.value(c, o) for o in others))].append(c)
    paths = []
    for gkey, gcells in groups.items():
        def coord(c: Cell, key: str) -> Any:
            return _get(c.flat, key)

        rows = sorted({coord(c, _HEAT_ROW) for c in gcells}, key=_sort_key)
        cols = sorted({coord(c, _HEAT_COL) for c in gcells}, key=_sort_key)
        bits = sorted({(summary.value(c, "w_bits"), summary.value(c, "a_bits")) for c in gcells},
                      key=lambda b: (_sort_key(b[0]), _sort_key(b[1])))
        grids = []
        for b in bits:
            grid = [[math.nan] * len(cols) for _ in rows]
            for c in gcells:
                if (summary.value(c, "w_bits"), summary.value(c, "a_bits")) == b:
                    grid[rows.index(coord(c, _HEAT_ROW))][cols.index(coord(c, _HEAT_COL))] = c.top1_mean
            grids.append(grid)
        finite = [v for g in grids for r in g for v in r if not math.isnan(v)]
        vmin, vmax = min(finite), max(finite)
        fig = Figure(figsize=(1.6 + (0.9 * len(cols) + 0.8) * len(bits), 1.8 + 0.5 * len(rows)),
                     layout="constrained")
        axes = fig.subplots(1, len(bits), squeeze=False)[0]
        image = None
        for ax, b, grid in zip(axes, bits, grids):
            image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                                color="white" if v < (vmin + vmax) / 2 else "black")
            ax.set_xticks(range(len(cols)), [str(v) for v in cols])
            ax.set_yticks(range(len(rows)), [str(v) for v in rows])
            ax.set_xlabel("gamma")
            ax.set_title(_bits_label(*b), fontsize=9)
        axes[0].set_ylabel("num_centroids")
        fig.colorbar(image, ax=list(axes), label="top-1 (%)")
        n_panel = len(_panel_labels(summary))
        extra = [f"{o.split('.', 1)[-1]}={v}" for o, v in zip(others, gkey[n_panel:])]
        title = " · ".join([_panel_title(summary, gkey[:n_panel]), *extra])
        fig.suptitle(f"SelectQ top-1: {title}", fontsize=9)
        suffix = "" if len(groups) == 1 else "_" + _slug(title)
        paths.append(_save(fig, out_dir / f"selectq_heatmap{suffix}.png"))
    return paths


def build(root: Path, out_dir: Optional[Path] = None, plots: bool = True,
          seeds: Optional[Sequence[int]] = None) -> tuple[Summary, list[Path]]:
    """Collect, aggregate and write summary.csv, failures.csv, summary.md and the PNGs.

    ``seeds`` keeps only jobs run at those seeds: a paired comparison of cells that were run at
    different numbers of seeds (e.g. ``refine=none`` at 5 seeds beside ``refine=kd`` at 3) must
    average over the same seeds on both sides.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = collect(root)
    if seeds is not None:
        wanted = {int(s) for s in seeds}
        jobs = [j for j in jobs if j.seed is not None and _seed_int(j.seed) in wanted]
    summary = aggregate(jobs, root)
    pngs: list[Path] = []
    if plots and summary.cells:
        pngs = plot_bits(summary, out_dir) + plot_selectq_heatmap(summary, out_dir)
    _write_text(out_dir / SUMMARY_CSV, _csv_text(summary.header(), summary.rows()))
    _write_text(out_dir / FAILURES_CSV,
                _csv_text(_FAILURE_HEADER, (_failure_fields(j) for j in summary.failures)))
    _write_text(out_dir / SUMMARY_MD, markdown(summary, pngs))
    log.info("sweep summary: %s → %s", _counts(summary), out_dir / SUMMARY_MD)
    return summary, [out_dir / SUMMARY_CSV, out_dir / FAILURES_CSV, out_dir / SUMMARY_MD, *pngs]


# ---------------------------------------------------------------------------------------------
# W&B aggregate run


def log_aggregate(summary: Summary, files: list[Path], logger_cfg: Any, group: str) -> None:
    """One W&B run (job_type "aggregate", same group as the sweep's job runs): table, failures, plots."""
    from calibbench.tracking import tracker

    config = {"sweep_dir": str(summary.root), "columns": summary.columns}
    with tracker(logger_cfg, summary.root, f"{group}-aggregate", config, "aggregate",
                 ["aggregate"], group) as track:
        if not track.active:
            return
        import wandb

        # W&B types each column from its values: key columns can mix text and numbers
        # (a field one strategy lacks), so they go as text; the metrics stay numbers.
        n_keys = len(summary.columns)
        rows = [[*("" if v == _MISSING else str(v) for v in r[:n_keys]), *r[n_keys:]] for r in summary.rows()]
        track.table("summary", summary.header(), rows)
        track.table("failures", _FAILURE_HEADER, [_failure_fields(j) for j in summary.failures])
        track.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
        track.summary({"jobs_ok": summary.n_ok, "jobs_failed": len(summary.failures),
                       "configurations": len(summary.cells)})
        artifact = wandb.Artifact(_slug(f"summary-{group}"), type="sweep-summary")
        for p in files:
            if p.suffix in (".csv", ".md"):
                artifact.add_file(str(p))
        track.run.log_artifact(artifact)


class AggregateCallback(Callback):
    """At the end of a multirun: summarize the sweep dir and log the aggregate W&B run.

    Registered in conf/config.yaml (``hydra.callbacks.aggregate``) so every sweep gets a summary.
    A failure here is logged, never raised: the per-job results are already on disk and
    ``python -m calibbench.report <sweep dir>`` rebuilds the summary from them.
    """

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary, files = build(sweep_dir, plots=self.plots)
            logger_cfg = config.get("logger")
            if logger_cfg is not None and logger_cfg.mode != "disabled":
                log_aggregate(summary, files, logger_cfg, sweep_dir.name)
        except Exception:  # noqa: BLE001 - see docstring
            log.exception("sweep summary failed; rebuild it with: python -m calibbench.report %s", sweep_dir)


# ---------------------------------------------------------------------------------------------
# CLI


def _seed_int(seed: Any) -> Optional[int]:
    try:
        return int(seed)
    except (TypeError, ValueError):
        return None


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m calibbench.report DIR`` / ``python -m calibbench report DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="calibbench report",
        description="Rebuild summary.csv, summary.md, failures.csv and plots from the result.json "
                    "files under a sweep folder (any depth).")
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/sweeps/2025-01-31_12-00-00-123456")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep dir)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                        help="only jobs at these seeds (paired comparisons; write with --out elsewhere)")
    parser.add_argument("--wandb", choices=("disabled", "offline", "online", "auto"), default="disabled",
                        help="also log the aggregate W&B run (group = the sweep dir's name)")
    parser.add_argument("--project", default="calibbench", help="W&B project (with --wandb)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    summary, files = build(args.sweep_dir, args.out, plots=not args.no_plots, seeds=args.seeds)
    if not summary.cells and not summary.failures:
        at = f" at seeds {','.join(map(str, args.seeds))}" if args.seeds is not None else ""
        print(f"error: no {RESULT_FILE} under {args.sweep_dir}{at}", file=sys.stderr)
        return 1
    if args.wandb != "disabled":
        from calibbench.config import LoggerConfig

        log_aggregate(summary, files, LoggerConfig(mode=args.wandb, project=args.project),
                      args.sweep_dir.resolve().name)
    print(_counts(summary))
    for job in summary.failures:
        print(f"  {job.status}: {job.path}: {_first_line(job.error, 160)}")
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
