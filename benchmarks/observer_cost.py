"""Cost of each range estimator: its calibration stage ÷ min/max's on the same set, and the whole
run ÷ min/max's (goals: calibration ≤ 3×, whole run ≤ 1.2× at ``budget=cpu``).

    python benchmarks/observer_cost.py                              # resnet20, W3A3, random, budget=cpu
    python benchmarks/observer_cost.py --repeats 1 budget.eval_limit=2000   # quicker, calibration only

Every run goes through ``pipeline.run`` with the same config but ``quant.act_observer`` (and
``quant.observer_reduce``), the FP evaluation and the calibration set taken from one warmed cache,
so the difference is the estimator. Runs alternate (minmax, percentile, mse, aciq, minmax, ...) so
background load hits each alike; medians per estimator, ratios to minmax printed last. Extra
arguments are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import compose, offline_env

ESTIMATORS = ("minmax", "percentile", "mse", "aciq")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each estimator")
    parser.add_argument("--reduce", nargs="+", default=["pooled", "batch_mean"],
                        help="quant.observer_reduce values to time (minmax ignores it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    offline_env()
    from calibbench import pipeline

    kinds = [("minmax", "-")] + [(e, r) for e in ESTIMATORS[1:] for r in args.reduce]
    with tempfile.TemporaryDirectory() as tmp:
        base = ["strategy=random", "bits=3", "seed=0", f"threads={args.threads}", "resume=false",
                f"paths.cache_dir={Path(tmp) / 'cache'}", *args.overrides]
        pipeline.run(compose(*base), Path(tmp) / "warm")  # FP eval + calibration set, untimed
        calib: dict[tuple, list[float]] = {k: [] for k in kinds}
        total: dict[tuple, list[float]] = {k: [] for k in kinds}
        for i in range(args.repeats):
            for est, red in kinds:
                extra = [f"quant.act_observer={est}"] + ([f"quant.observer_reduce={red}"] if red != "-" else [])
                record = pipeline.run(compose(*base, *extra), Path(tmp) / f"{est}_{red}_{i}")
                t = record["timings"]
                calib[(est, red)].append(t["calibrate"])
                total[(est, red)].append(t["total"])
                print(f"run {i} {est:10s} {red:10s}: calibrate {t['calibrate']:.2f} s, total "
                      f"{t['total']:.1f} s, top-1 {record['metrics']['quant']['top1']:.2f}", flush=True)
    c0, t0 = statistics.median(calib[kinds[0]]), statistics.median(total[kinds[0]])
    print("\nmedians (the machine may be shared: say so with the numbers)")
    print(f"{'estimator':10s} {'reduce':10s} {'calibrate s':>11s} {'÷ minmax':>9s} {'total s':>8s} {'÷ minmax':>9s}")
    for k in kinds:
        c, t = statistics.median(calib[k]), statistics.median(total[k])
        print(f"{k[0]:10s} {k[1]:10s} {c:11.2f} {c / c0:9.2f} {t:8.1f} {t / t0:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
