"""The files a person reads: summary.md (pivots, paired differences to random, random's spread,
all configurations, stage seconds, failures) and summary.csv / failures.csv."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from calibbench.report import significance as sig
from calibbench.report import views as v
from calibbench.report.load import MISSING, STAGES, Cell, Summary, load_diagnostics

FAILURE_HEADER = ["job", "status", "strategy", "model", "w_bits", "a_bits", "seed", "error"]
PAIRED_COLUMNS = ["diff_random_mean", "diff_random_low", "diff_random_high", "diff_random_n"]
# A histogram of random's top-1 (and each strategy's percentile in it) needs this many random
# seeds in one cell; a 5-seed compare sweep gets the paired intervals instead.
VARIANCE_MIN_SEEDS = 20


def fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def md_table(frame: pd.DataFrame) -> list[str]:
    """GitHub Markdown via ``DataFrame.to_markdown`` (tabulate); text kept as written (no number
    parsing, so 80.00 stays 80.00), pipes escaped, missing values blank."""
    text = frame.map(lambda x: "" if x is None or x == MISSING or (isinstance(x, float) and pd.isna(x))
                     else str(x).replace("|", "\\|").replace("\n", " "))
    return text.to_markdown(index=False, disable_numparse=True).splitlines()


def first_line(error: Any, limit: int = 300) -> str:
    text = str(error or "").strip().splitlines() if isinstance(error, str) else []
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def failures_frame(summary: Summary) -> pd.DataFrame:
    def val(job: dict, key: str) -> Any:
        value = job.get(key)
        return None if value is None or (isinstance(value, float) and pd.isna(value)) else value

    rows = [[val(j, "path"), val(j, "status"), val(j, "cfg:strategy.name"), val(j, "cfg:model.name"),
             val(j, "cfg:w_bits"), val(j, "cfg:a_bits"), val(j, "seed"), first_line(val(j, "error"))]
            for j in summary.failures]
    return pd.DataFrame(rows, columns=FAILURE_HEADER, dtype=object)


def counts(summary: Summary) -> str:
    return (f"{summary.n_ok} jobs ok, {len(summary.failures)} failed or unfinished, "
            f"{len(summary.cells)} configurations")


def paired(summary: Summary) -> dict[int, sig.PairedDiff]:
    """id(cell) → paired difference to its ``random`` partner (cells without one are absent)."""
    out = {}
    for cell in summary.cells:
        if summary.value(cell, "strategy") == v.REFERENCE or not cell.top1_by_seed:
            continue
        ref = v.reference_cell(summary, cell)
        if ref is not None and (d := sig.paired_to_reference(cell.top1_by_seed, ref.top1_by_seed)):
            out[id(cell)] = d
    return out


def summary_frame(summary: Summary, diffs: dict[int, sig.PairedDiff]) -> pd.DataFrame:
    """summary.csv: the cell table plus the paired difference to random (blank where none)."""
    extra = [[d.mean, d.low, d.high, d.n] if (d := diffs.get(id(c))) else [None] * 4 for c in summary.cells]
    frame = summary.table.copy()
    for i, name in enumerate(PAIRED_COLUMNS):
        values: list[Optional[float]] = [None if (x := e[i]) is None else (round(x, 4) if i < 3 else int(x))
                                         for e in extra]
        frame[name] = pd.Series(values, dtype=object)
    return frame


def csv_text(frame: pd.DataFrame) -> str:
    return frame.replace({MISSING: None}).to_csv(index=False, lineterminator="\n")


def _pivot(summary: Summary, cells: list[Cell], text) -> pd.DataFrame:
    """strategy variant × bits, ``text(cell)`` in each filled position."""
    bits = sorted({v.bits_of(summary, c) for c in cells}, key=v.bits_order)
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    for c in cells:
        rows[v.variant(summary, c)][v.bits_label(*v.bits_of(summary, c))] = text(c)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[v.bits_label(*b) for b in bits])
    return frame.rename_axis("strategy").reset_index().fillna("")


def _top1_text(c: Cell) -> str:
    text = fmt(c.top1_mean, c.top1_std)
    return f"{text} ({c.n_failed} failed)" if c.n_failed else text


def _paired_section(summary: Summary, cells: list[Cell], diffs: dict[int, sig.PairedDiff]) -> list[str]:
    rows = [c for c in cells if id(c) in diffs]
    if not rows:
        return []
    table = _pivot(summary, rows, lambda c: diffs[id(c)].text())
    return ["Paired Δ top-1 vs random at the same seeds (pairs share the seed, hence the pool): "
            f"mean [95% bootstrap CI, {sig.N_RESAMPLES:,} resamples of the per-seed differences, "
            f"seed {sig.SEED}]; * = the interval excludes 0.", "", *md_table(table), ""]


def variance_rows(summary: Summary, cells: list[Cell]) -> list[tuple[tuple, Cell, list[tuple[Cell, float]]]]:
    """Per bit-width and estimator with a random cell of ≥ VARIANCE_MIN_SEEDS seeds: (bits, random
    cell, [(other cell under the same estimator, percentile of its mean top-1 within random's
    per-seed top-1)]). Estimators are never mixed: a strategy under MSE is placed in random's
    spread under MSE."""
    out = []
    for ref in cells:
        if not v.is_reference(summary, ref) or ref.n < VARIANCE_MIN_SEEDS:
            continue
        b, est = v.bits_of(summary, ref), v.estimator(ref)
        others = [(c, sig.percentile_within(list(ref.top1_by_seed.values()), c.top1_mean))
                  for c in cells if c is not ref and v.bits_of(summary, c) == b
                  and v.estimator(c) == est and c.top1_mean is not None]
        out.append((b, ref, others))
    return sorted(out, key=lambda r: (v.bits_order(r[0]), v.row_order(summary, r[1])))


def _estimator_section(summary: Summary, cells: list[Cell], diffs: dict[int, sig.PairedDiff]) -> list[str]:
    """With more than one estimator in a panel: strategy × (estimator, bits), top-1 and the paired
    difference to random under the same estimator — does an advantage survive the estimator?"""
    ests = {v.estimator(c) for c in cells}
    if len(ests) < 2:
        return []
    est_label = {c.key: (", ".join(v.estimator_opts(c)) or "preset default") for c in cells}
    cols: list[str] = []
    rows: dict[str, dict[str, str]] = defaultdict(dict)
    for c in cells:
        col = f"{est_label[c.key]} · {v.bits_label(*v.bits_of(summary, c))}"
        if col not in cols:
            cols.append(col)
        name = v.strategy_label(summary, c)
        d = diffs.get(id(c))
        rows[name][col] = _top1_text(c) + (f"<br>Δ {d.text()}" if d else "")
    order = sorted(cols, key=lambda t: (t.rsplit(" · ", 1)[1], cols.index(t)))
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=order)
    frame = frame.rename_axis("strategy").reset_index().fillna("")
    return ["### Strategy × range estimator", "",
            "Top-1 mean ± std; Δ = paired difference to random under the same estimator and bits "
            "(mean [95% bootstrap CI]; * = excludes 0).", "", *md_table(frame), ""]


def diagnostic_numbers(run: dict) -> Optional[tuple[float, float, float]]:
    """One job's activation quantizers in three numbers: median range inflation (calibrated range ÷
    the evaluation data's 0.1–99.9th percentile range), mean clipping rate (%) and mean
    activation-quantization SNR (dB). None when the file holds no activation layer."""
    acts = [layer for layer in run.get("layers", []) if layer.get("kind") == "activation"]
    if not acts:
        return None
    def col(key: str) -> pd.Series:
        return pd.Series([layer.get(key) for layer in acts], dtype=float)

    return (float(col("range_inflation").median()), float(col("clip_rate").mean() * 100),
            float(col("act_quant_snr_db").mean()))


def _diagnostics_section(summary: Summary, cells: list[Cell]) -> list[str]:
    """Where jobs wrote diagnostics.json: how the estimator and the calibration set interact —
    per estimator, bits and strategy, the activation diagnostics as mean ± std over seeds (the
    per-layer curves are in diagnostics_*.png)."""
    rows = []
    for c in cells:
        per_seed = [n for run in load_diagnostics(summary.root, c) if (n := diagnostic_numbers(run))]
        if not per_seed:
            continue
        frame = pd.DataFrame(per_seed, columns=["ri", "clip", "snr"])
        std = {k: None if len(frame) < 2 else float(frame[k].std()) for k in frame.columns}
        order = v.row_order(summary, c)
        rows.append(((order[0], v.bits_order(v.bits_of(summary, c)), order[1:]), [
                     ", ".join(v.estimator_opts(c)) or "preset default",
                     v.bits_label(*v.bits_of(summary, c)), v.strategy_label(summary, c), len(frame),
                     fmt(frame["ri"].mean(), std["ri"]), fmt(frame["clip"].mean(), std["clip"]),
                     fmt(frame["snr"].mean(), std["snr"])]))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    header = ["estimator", "bits", "strategy", "n", "range inflation (median layer)", "clipped %",
              "act-quant SNR dB"]
    return ["### Activation diagnostics per estimator", "",
            "Per job over the activation quantizers: median range inflation (calibrated range ÷ the "
            "evaluation images' 0.1–99.9th percentile range; > 1 = wasted levels), mean share of "
            "evaluation values clipped, mean SNR of activation quantization; mean ± std over seeds.",
            "", *md_table(pd.DataFrame([r[1] for r in rows], columns=header)), ""]


def _variance_section(summary: Summary, cells: list[Cell]) -> list[str]:
    lines: list[str] = []
    for b, ref, others in variance_rows(summary, cells):
        vals = pd.Series(list(ref.top1_by_seed.values()))
        est = ", ".join(v.estimator_opts(ref))
        lines += [f"### Random-calibration spread, {v.bits_label(*b)}" + (f" · {est}" if est else ""), "",
                  f"random over {ref.n} seeds: mean {vals.mean():.2f}, std {vals.std():.2f}, "
                  f"min {vals.min():.2f}, 5th pct {vals.quantile(0.05):.2f}, median {vals.median():.2f}, "
                  f"95th pct {vals.quantile(0.95):.2f}, max {vals.max():.2f}. Percentile = percent of "
                  "random seeds below the strategy's mean top-1 (ties count half).", ""]
        if others:
            rows = [[v.variant(summary, c), c.n, fmt(c.top1_mean, c.top1_std), f"{p:.1f}",
                     " ".join(f"{sig.percentile_within(list(ref.top1_by_seed.values()), t):.0f}"
                              for t in c.top1_by_seed.values())] for c, p in others]
            lines += md_table(pd.DataFrame(rows, columns=["strategy", "n", "top-1", "percentile in random",
                                                          "per-seed percentiles"])) + [""]
    return lines


def stage_table(summary: Summary) -> list[str]:
    """Mean wall seconds per stage and job, per configuration (what each method costs where).

    ``calibration`` is near 0 where a job took its set from the cache (e.g. the second bit-width
    of a sweep); jobs that ran side by side share the cores, so compare within a sweep."""
    stages = [st for st in STAGES if any(st in c.stage_s for c in summary.cells)]
    if not stages:
        return []
    labels = [c for c in v.panel_labels(summary) if c in ("model", "dataset")]
    rows = [[*(summary.value(c, p) for p in labels), v.variant(summary, c),
             v.bits_label(*v.bits_of(summary, c)), c.n, *(fmt(c.stage_s.get(st)) for st in stages)]
            for cells in v.panels(summary).values() for c in cells]
    frame = pd.DataFrame(rows, columns=[*labels, "strategy", "bits", "n", *(f"{st} s" for st in stages)])
    return (["## Stage seconds (mean per job)", "",
             "`calibration` ≈ 0 where the set came from the cache; jobs that ran in parallel shared "
             "the cores.", ""] + md_table(frame) + [""])


def markdown(summary: Summary, plots: Sequence[Path] = (),
             diffs: Optional[dict[int, sig.PairedDiff]] = None) -> str:
    """summary.md: per panel the strategy × bits pivot, the paired differences to random and (with
    enough random seeds) random's spread; then all configurations, stage seconds, failures, plots."""
    diffs = paired(summary) if diffs is None else diffs
    n_fail = len(summary.failures)
    lines = [f"# Sweep summary: {summary.root.name}", "",
             f"{counts(summary)}. "
             "Top-1/top-5 accuracy in %, mean ± sample std over seeds (n seeds; no ± when n = 1); "
             "FP = the full-precision model on the same evaluation images.", ""]
    if n_fail:
        lines += [f"**{n_fail} job(s) failed or did not finish — see [Failed jobs](#failed-jobs).**", ""]
    for panel, cells in v.panels(summary).items():
        fps = pd.Series([c.fp_top1 for c in cells if c.fp_top1 is not None], dtype=float)
        lines += [f"## Top-1: {v.panel_title(summary, panel)}", ""]
        if len(fps):
            lines += [f"FP top-1: {fmt(fps.mean())}", ""]
        lines += md_table(_pivot(summary, cells, _top1_text)) + [""]
        lines += _paired_section(summary, cells, diffs)
        lines += _estimator_section(summary, cells, diffs)
        lines += _diagnostics_section(summary, cells)
        lines += _variance_section(summary, cells)
    lines += ["## All configurations", ""]
    refined = any(c.refine_s_mean is not None for c in summary.cells)
    rows = [[*c.key, c.n, " ".join(map(str, c.seeds)), fmt(c.fp_top1), fmt(c.top1_mean, c.top1_std),
             fmt(c.top5_mean, c.top5_std), *([fmt(c.refine_s_mean)] if refined else []), c.n_failed or ""]
            for c in summary.cells]
    header = [*summary.columns, "n", "seeds", "FP top-1", "top-1", "top-5",
              *(["refine s/job"] if refined else []), "failed"]
    lines += md_table(pd.DataFrame(rows, columns=header)) + [""]
    lines += stage_table(summary)
    lines += ["## Failed jobs", ""]
    lines += (md_table(failures_frame(summary)) if n_fail else ["None."]) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)
