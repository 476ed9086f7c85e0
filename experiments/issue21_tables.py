"""The tables of docs/results.md "Issue 21" from the finished runs of a sweep folder.

    python experiments/issue21_tables.py outputs/sweeps/i21_grid [outputs/sweeps/i21_val]

Reads every ``result.json`` with ``status == ok`` and prints, per bit-width and ``refine.init``:
top-1 mean ± sample std over seeds (rows: strategy, columns: refiner), the paired difference to
random's set of the same seed inside each refiner (mean and per seed), and the refinement seconds.
Validation-split runs print as one table of (refiner, option) rows.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REFINERS = ("none", "adaround", "brecq", "qdrop")


def load(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.rglob("result.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "ok":
            out.append(record)
    return out


def key(record: dict) -> tuple:
    cfg = record["config"]
    refine = cfg["refine"]["name"]
    init = cfg["refine"].get("init") if refine in REFINERS[1:] else "-"
    return (cfg["bits"], init or "-", cfg["strategy"]["name"], refine)


def fmt(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (n=1)" if values else ""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def grid(records: list[dict]) -> None:
    cells: dict[tuple, dict[int, float]] = defaultdict(dict)
    seconds: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r["config"].get("eval_split", "test") != "test":
            continue
        cells[key(r)][r["seed"]] = r["metrics"]["quant"]["top1"]
        seconds[key(r)].append(float((r.get("refine") or {}).get("seconds") or 0.0))
    for bits in sorted({k[0] for k in cells}):
        for init in ("mse", "calibrated"):
            refiners = [f for f in REFINERS if any(k[0] == bits and k[3] == f and k[1] in (init, "-")
                                                   for k in cells)]
            if not any(k[0] == bits and k[1] == init for k in cells):
                continue
            strategies = sorted({k[2] for k in cells if k[0] == bits and k[1] in (init, "-")},
                                key=lambda s: (s != "random", s))
            print(f"\nW{bits}A{bits}, refine.init={init} (none: calibration only)\n")
            print("| strategy | " + " | ".join(refiners) + " | refine s/job (" + " / ".join(refiners[1:]) + ") |")
            print("|---" * (len(refiners) + 2) + "|")
            for s in strategies:
                row, secs = [], []
                for f in refiners:
                    k = (bits, "-" if f == "none" else init, s, f)
                    row.append(fmt(list(cells[k].values())) if k in cells else "")
                    if f != "none":
                        secs.append(f"{statistics.mean(seconds[k]):.0f}" if k in seconds else "")
                print(f"| {s} | " + " | ".join(row) + " | " + " / ".join(secs) + " |")
            print("\npaired difference to random (same seed, same refiner): mean (per seed)\n")
            print("| strategy | " + " | ".join(refiners) + " |")
            print("|---" * (len(refiners) + 1) + "|")
            for s in strategies:
                if s == "random":
                    continue
                row = []
                for f in refiners:
                    k = (bits, "-" if f == "none" else init, s, f)
                    base = cells.get((bits, k[1], "random", f), {})
                    diffs = [cells[k][seed] - base[seed] for seed in sorted(cells.get(k, {})) if seed in base]
                    row.append(f"{statistics.mean(diffs):+.2f} ({' / '.join(f'{d:+.2f}' for d in diffs)})"
                               if diffs else "")
                print(f"| {s} | " + " | ".join(row) + " |")


def validation(records: list[dict]) -> None:
    rows: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        cfg = r["config"]
        ref = cfg["refine"]
        option = (f"act_lr={ref.get('act_lr')}" if ref["name"] in ("qdrop", "brecq") else
                  f"features={ref['plf']['features']}" if ref["name"] == "plf" else f"lr={ref.get('lr')}")
        rows[(cfg["strategy"]["name"], ref["name"], cfg["bits"], option)][r["seed"]] = r["metrics"]["quant"]["top1"]
    print("\n| strategy | refine | bits | option | val top-1 per seed | mean ± std |\n|---|---|---|---|---|---|")
    for k in sorted(rows):
        seeds = rows[k]
        print(f"| {k[0]} | {k[1]} | W{k[2]}A{k[2]} | {k[3]} | "
              f"{' / '.join(f'{seeds[s]:.2f}' for s in sorted(seeds))} | {fmt(list(seeds.values()))} |")


def main() -> None:
    for folder in map(Path, sys.argv[1:]):
        records = load(folder)
        print(f"## {folder} ({len(records)} finished runs)")
        if records and records[0]["config"].get("eval_split") == "val":
            validation(records)
        else:
            grid(records)


if __name__ == "__main__":
    main()
