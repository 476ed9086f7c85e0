"""The aggregate W&B run of a sweep: summary and failure tables, plots, the CSV/Markdown files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibbench.report.load import MISSING, Summary
from calibbench.report.tables import failures_frame, paired, summary_frame
from calibbench.report.views import slug


def log_aggregate(summary: Summary, files: list[Path], logger_cfg: Any, group: str) -> None:
    """One W&B run (job_type "aggregate", same group as the sweep's job runs): table, failures, plots."""
    from calibbench.tracking import tracker

    config = {"sweep_dir": str(summary.root), "columns": summary.columns}
    with tracker(logger_cfg, summary.root, f"{group}-aggregate", config, "aggregate",
                 ["aggregate"], group) as track:
        if not track.active:
            return
        import wandb

        # W&B types each column from its values: key columns can mix text and numbers (a field
        # one strategy lacks), so they go as text; the metrics stay numbers (None where missing).
        frame = summary_frame(summary, paired(summary))
        n_keys = len(summary.columns)
        rows = [[*("" if x == MISSING else str(x) for x in r[:n_keys]),
                 *(None if x is None or x != x else x for x in r[n_keys:])]
                for r in frame.itertuples(index=False)]
        track.table("summary", list(frame.columns), rows)
        failures = failures_frame(summary).astype(str)
        track.table("failures", list(failures.columns), failures.values.tolist())
        track.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"})
        track.summary({"jobs_ok": summary.n_ok, "jobs_failed": len(summary.failures),
                       "configurations": len(summary.cells)})
        artifact = wandb.Artifact(slug(f"summary-{group}"), type="sweep-summary")
        for p in files:
            if p.suffix in (".csv", ".md"):
                artifact.add_file(str(p))
        track.run.log_artifact(artifact)
