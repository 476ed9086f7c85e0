"""``python -m calibbench [overrides]``: a thin Hydra wrapper around :func:`calibbench.pipeline.run`.

``python -m calibbench report <sweep dir>`` rebuilds a sweep's tables and plots;
``python -m calibbench export RUN_DIR [--format onnx] [--out PATH] [--fused | --exact]`` exports a
finished run's quantized model and checks it under onnxruntime (deploy.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from calibbench.config import ConfigError
from calibbench.store import register_configs

log = logging.getLogger("calibbench")


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _threads_per_job(launcher: DictConfig) -> Optional[int]:
    """Torch threads for one job when the joblib launcher runs ``n_jobs`` at once (DESIGN.md #9).

    Without this every job starts one thread per core and 2 jobs on 2 cores fight over them.
    Only joblib's config has ``n_jobs``; under other launchers ``threads=N`` on the command line
    (e.g. SLURM's cpus_per_task) sets it, and unset leaves torch's default.
    """
    n_jobs = OmegaConf.select(launcher, "n_jobs")
    if n_jobs is None:
        return None
    cpus = os.cpu_count() or 1
    if n_jobs < 0:  # joblib's convention: -1 = all CPUs, -2 = all but one, ...
        n_jobs = cpus + 1 + n_jobs
    return max(1, cpus // max(1, n_jobs))


@hydra.main(version_base="1.3", config_path="pkg://calibbench.conf", config_name="config")
def _task(cfg: DictConfig) -> Optional[float]:
    from calibbench import pipeline

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:  # one line per job in a sweep, no progress bars fighting over the terminal
        cfg.progress = False
        if cfg.threads is None:
            cfg.threads = _threads_per_job(hc.launcher)
    group = Path(hc.sweep.dir).name if multirun else None
    try:
        record = pipeline.run(cfg, hc.runtime.output_dir, group)
    except ConfigError as err:
        log.error("%s", err)
        if multirun:
            return None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # recorded as status: failed; a sweep goes on with the next job
        if isinstance(err, FloatingPointError):  # a NaN or diverged loss: the message says it all
            log.error("run failed: %s: %s (traceback in result.json)", type(err).__name__, err)
        else:
            log.exception("run failed: %s", err)
        if multirun:
            return None
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    _print_table(pipeline.summary_rows(record))
    for fmt, entry in record.get("export", {}).items():
        print(f"  export {fmt} ({entry['form']}): {entry['path']}  agreement {entry['agreement']:.2f}%  "
              f"onnxruntime top-1 {entry['top1']:.2f}  integer/float layers "
              f"{entry['integer_layers']}/{entry['float_layers']}")
    print(Path(record["run_dir"]) / pipeline.RESULT_FILE)
    return float(record["metrics"]["quant"]["top1"])


# Command-line aliases: ``diagnostics=true`` reads as ``diagnostics.enabled=true`` (a key cannot be
# both a bool and a node with ``diagnostics.eval_images``, and Hydra rejects a bool as a group option).
_ALIASES = {"diagnostics": "diagnostics.enabled"}


def _alias(arg: str) -> str:
    key, sep, value = arg.partition("=")
    prefix = key[:1] if key[:1] in "+~" else ""
    return f"{prefix}{_ALIASES[key[len(prefix):]]}={value}" if sep and key[len(prefix):] in _ALIASES else arg


def export_main(argv: list[str]) -> int:
    """``calibbench export RUN_DIR [--format onnx] [--out PATH] [--fused | --exact]``: exit 0, or 2
    with one error line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m calibbench export",
                                     description="Export a finished run's quantized model and check "
                                                 "it under onnxruntime on the run's evaluation split.")
    parser.add_argument("run_dir")
    parser.add_argument("--format", default="onnx", choices=["onnx"])
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.onnx)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--fused", dest="exact", action="store_false", default=None,
                      help="the fused QDQ graph (QLinearConv; faster, not bit-exact)")
    form.add_argument("--exact", dest="exact", action="store_true", default=None,
                      help="the bit-exact graph (ConvInteger/MatMulInteger)")
    args = parser.parse_args(argv)
    from calibbench import deploy
    from calibbench.quant.export import ExportError

    try:
        entry = deploy.export_run(args.run_dir, args.format, args.out, args.exact)
    except (ExportError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_table([("file", entry["path"]), ("form", entry["form"]),
                  ("onnxruntime top-1", f"{entry['top1']:.2f}"),
                  ("fake-quant top-1", f"{entry['top1_fake_quant']:.2f}"),
                  ("agreement (%)", f"{entry['agreement']:.2f}"),
                  ("max |logit diff|", f"{entry['max_abs_logit_diff']:.4g}"),
                  ("integer / float layers", f"{entry['integer_layers']} / {entry['float_layers']}"),
                  ("seconds", f"{entry['seconds']:.2f}")])
    return 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        sys.exit(export_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from calibbench import report

        sys.exit(report.main(sys.argv[2:]))
    sys.argv = [sys.argv[0], *map(_alias, sys.argv[1:])]
    register_configs()
    try:
        _task()
    except KeyboardInterrupt:  # the run's result.json says failed; finished jobs and the cache are kept
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    from calibbench.report import LAST_SWEEP

    if LAST_SWEEP.get("failed"):  # after the summary is written: a script or CI can tell
        print(f"error: {LAST_SWEEP['failed']} of {LAST_SWEEP['jobs']} jobs failed; see "
              f"{LAST_SWEEP['failures_csv']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
