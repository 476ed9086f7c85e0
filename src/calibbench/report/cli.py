"""``build``: a folder of result.json files → summary.csv, failures.csv, summary.md and plots;
``main``: the ``calibbench report DIR`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from calibbench.report import plots as figures
from calibbench.report import tables
from calibbench.report.load import RESULT_FILE, Summary, aggregate, load_jobs

log = logging.getLogger(__name__)

SUMMARY_CSV, SUMMARY_MD, FAILURES_CSV = "summary.csv", "summary.md", "failures.csv"


def _write_text(path: Path, text: str) -> None:
    from calibbench.cache import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _seed_int(seed: Any) -> Optional[int]:
    try:
        return int(seed)
    except (TypeError, ValueError):
        return None


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
    jobs = load_jobs(root)
    if seeds is not None and not jobs.empty:
        wanted = {int(s) for s in seeds}
        jobs = jobs[jobs["seed"].map(lambda s: _seed_int(s) in wanted)].reset_index(drop=True)
    summary = aggregate(jobs, root)
    diffs = tables.paired(summary)
    pngs: list[Path] = []
    if plots and summary.cells:
        pngs = (figures.plot_bits(summary, out_dir) + figures.plot_selectq_heatmap(summary, out_dir)
                + figures.plot_variance(summary, out_dir) + figures.plot_diagnostics(summary, out_dir))
    _write_text(out_dir / SUMMARY_CSV, tables.csv_text(tables.summary_frame(summary, diffs)))
    _write_text(out_dir / FAILURES_CSV, tables.csv_text(tables.failures_frame(summary)))
    _write_text(out_dir / SUMMARY_MD, tables.markdown(summary, pngs, diffs))
    log.info("sweep summary: %s → %s", tables.counts(summary), out_dir / SUMMARY_MD)
    return summary, [out_dir / SUMMARY_CSV, out_dir / FAILURES_CSV, out_dir / SUMMARY_MD, *pngs]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


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
    if not summary.cells and not len(summary.failures):
        at = f" at seeds {','.join(map(str, args.seeds))}" if args.seeds is not None else ""
        print(f"error: no {RESULT_FILE} under {args.sweep_dir}{at}", file=sys.stderr)
        return 1
    if args.wandb != "disabled":
        from calibbench.config import LoggerConfig
        from calibbench.report.wandb_upload import log_aggregate

        log_aggregate(summary, files, LoggerConfig(mode=args.wandb, project=args.project),
                      args.sweep_dir.resolve().name)
    print(tables.counts(summary))
    for job in tables.failures_frame(summary).itertuples(index=False):
        print(f"  {job.status}: {job.job}: {tables.first_line(job.error, 160)}")
    for path in files:
        print(path)
    return 0
