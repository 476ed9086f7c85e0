"""Sweep aggregation: every ``result.json`` under a folder → summary.csv, summary.md, plots, W&B.

One module per job: :mod:`.load` (result files → job table → cells), :mod:`.significance`
(paired bootstrap against random, percentiles in random's spread), :mod:`.tables` (Markdown and
CSV), :mod:`.plots` (PNGs), :mod:`.wandb_upload` (the aggregate W&B run), :mod:`.cli` (the
``build`` function and the ``calibbench report DIR`` command line).

This file stays light (no pandas, matplotlib, wandb or torch): Hydra instantiates
:class:`AggregateCallback` at the start of every run. The rest is imported on first use.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

# name → submodule that defines it (``report.build(...)``, ``report.main(...)`` as before the split)
_LAZY = {"build": "cli", "main": "cli", "SUMMARY_CSV": "cli", "SUMMARY_MD": "cli",
         "FAILURES_CSV": "cli", "log_aggregate": "wandb_upload", "load_jobs": "load",
         "aggregate": "load", "Summary": "load", "Cell": "load", "RESULT_FILE": "load",
         "markdown": "tables", "paired_bootstrap": "significance", "PairedDiff": "significance"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The outcome of the last multirun in this process (set by AggregateCallback): the CLI exits
# non-zero after the summary is written when any job failed.
LAST_SWEEP: dict[str, Any] = {}


def _count_failed(sweep_dir: Path) -> tuple[int, int]:
    """(jobs not ok, jobs) from the result files, without the report's dependencies."""
    import json

    failed = total = 0
    for path in sweep_dir.rglob("result.json"):
        total += 1
        try:
            failed += json.loads(path.read_text()).get("status") != "ok"
        except (OSError, ValueError):
            failed += 1
    return failed, total


class AggregateCallback(Callback):
    """At the end of a multirun: summarize the sweep dir and log the aggregate W&B run.

    Registered in conf/config.yaml (``hydra.callbacks.aggregate``) so every sweep gets a summary.
    A failure here is logged, never raised: the per-job results are already on disk and
    ``python -m calibbench report <sweep dir>`` rebuilds the summary from them.
    """

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from calibbench.report.cli import build
        from calibbench.report.wandb_upload import log_aggregate
        from calibbench.tracking import resolve_mode

        sweep_dir = Path(config.hydra.sweep.dir)
        failed, total = _count_failed(sweep_dir)
        LAST_SWEEP.update(dir=sweep_dir, failed=failed, jobs=total, failures_csv=sweep_dir / "failures.csv")
        try:
            summary, files = build(sweep_dir, plots=self.plots)
            LAST_SWEEP.update(failed=len(summary.failures))
            logger_cfg = config.get("logger")
            if logger_cfg is not None and resolve_mode(logger_cfg.mode) != "disabled":
                log_aggregate(summary, files, logger_cfg, sweep_dir.name)
        except Exception:  # any failure: see docstring
            log.exception("sweep summary failed; rebuild it with: python -m calibbench report %s", sweep_dir)


class OutputCheck(Callback):
    """Before Hydra creates the run or sweep folder: a folder that cannot be written is one line
    naming it (exit 2), not Hydra's chained traceback."""

    def _check(self, path: str) -> None:
        import sys

        from calibbench.config import ConfigError, check_writable

        try:
            check_writable(path, "the output folder")
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
