"""Cost of ``diagnostics=true``: a whole run with diagnostics ÷ the same run without (goal ≤ 1.5).

    python benchmarks/diagnostics_cost.py                       # budget=cpu, resnet20, W3A3, random
    python benchmarks/diagnostics_cost.py --repeats 1 budget.eval_limit=2000   # quicker

Both runs go through ``pipeline.run`` with the same config (``diagnostics.eval_images`` at its
default 1,000 unless overridden), the FP evaluation and the calibration set taken from the same
cache (warmed before timing), so the difference is the diagnostics pass itself. Runs alternate
(off, on, off, on, ...) so background load hits both alike; the ratio of the medians of the
``total`` stage seconds is printed last. Extra arguments are Hydra overrides for both runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import compose, offline_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each kind")
    parser.add_argument("--cache", default=None, help="paths.cache_dir (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args(argv)
    offline_env()
    from calibbench import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or str(Path(tmp) / "cache")
        base = ["strategy=random", "bits=3", "seed=0", "threads=2", "resume=false",
                f"paths.cache_dir={cache}", *args.overrides]
        if args.cache is None:  # fill the cache (FP eval, calibration set) outside the timings
            pipeline.run(compose(*base), Path(tmp) / "warm")
        totals: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(args.repeats):
            for kind in ("off", "on"):
                cfg = compose(*base, f"diagnostics.enabled={kind == 'on'}")
                record = pipeline.run(cfg, Path(tmp) / f"{kind}{i}")
                t = record["timings"]
                totals[kind].append(t["total"])
                print(f"run {i} diagnostics={kind}: total {t['total']:.1f} s (quant_eval "
                      f"{t['quant_eval']:.1f} s, diagnostics {t.get('diagnostics', 0.0):.1f} s, "
                      f"top-1 {record['metrics']['quant']['top1']:.2f})", flush=True)
    off, on = statistics.median(totals["off"]), statistics.median(totals["on"])
    print(f"median total: without {off:.1f} s, with {on:.1f} s (the machine is shared: other "
          "sessions' load changes both; the runs alternate)")
    print(f"ratio {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
