"""PNG figures: top-1 vs bits, SelectQ's heat map, random's top-1 histogram with each strategy
marked, and per-layer diagnostics (clipping, range inflation, SNR) with one line per strategy.

matplotlib's object API (``Figure``, Agg canvas) and no pyplot state: safe in any process.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from calibbench.figures import layer_figure, save
from calibbench.report import views as v
from calibbench.report.load import ESTIMATOR_FIELDS, MISSING, Cell, Summary, load_diagnostics, sort_key

_HEAT_ROW, _HEAT_COL = "strategy.num_centroids", "strategy.gamma"


def plot_bits(summary: Summary, out_dir: Path) -> list[Path]:
    """Top-1 vs bits, one line per strategy variant with ±std error bars, FP dashed; one PNG per panel."""
    from matplotlib.figure import Figure

    panels = v.panels(summary)
    paths = []
    for panel, cells in panels.items():
        measured = [c for c in cells if c.top1_mean is not None]
        if not measured:
            continue
        same = all(summary.value(c, "w_bits") == summary.value(c, "a_bits") for c in measured)
        ticks = sorted({v.bits_of(summary, c) for c in measured}, key=v.bits_order)
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.subplots()
        variants: dict[str, list[Cell]] = defaultdict(list)
        for c in measured:
            variants[v.variant(summary, c)].append(c)
        for name, vc in variants.items():
            vc.sort(key=lambda c: ticks.index(v.bits_of(summary, c)))
            xs = [summary.value(c, "w_bits") if same else ticks.index(v.bits_of(summary, c)) for c in vc]
            means = [c.top1_mean for c in vc if c.top1_mean is not None]  # all: vc are measured cells
            ax.errorbar(xs, means, yerr=[c.top1_std or 0.0 for c in vc],
                        marker="o", capsize=3, label=name)
        fps = [c.fp_top1 for c in measured if c.fp_top1 is not None]
        if fps:
            ax.axhline(float(np.mean(fps)), linestyle="--", color="gray", label="FP")
        if same:
            ax.set_xticks([b[0] for b in ticks])
            ax.set_xlabel("bits (weights = activations)")
        else:
            ax.set_xticks(range(len(ticks)), [v.bits_label(*b) for b in ticks])
            ax.set_xlabel("bits")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(v.panel_title(summary, panel), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        name = "top1_vs_bits" if len(panels) == 1 else f"top1_vs_bits_{v.slug(v.panel_title(summary, panel))}"
        paths.append(save(fig, out_dir / f"{name}.png"))
    return paths


def plot_selectq_heatmap(summary: Summary, out_dir: Path) -> list[Path]:
    """SelectQ mean top-1 over num_centroids × gamma, one subplot per bit-width.

    Drawn only when the folder sweeps at least one of the two fields for selectq; one figure per
    panel and per combination of SelectQ's other swept fields, so cells are never mixed.
    """
    from matplotlib.figure import Figure

    swept = {_HEAT_ROW, _HEAT_COL} & set(summary.columns)
    cells = [c for c in summary.cells if summary.value(c, "strategy") == "selectq" and c.top1_mean is not None]
    if not swept or not cells:
        return []
    others = [c for c in [*v.strategy_labels(summary)[1:], *v.refine_labels(summary),
                          *(f for f in summary.columns if f in ESTIMATOR_FIELDS)]
              if c not in (_HEAT_ROW, _HEAT_COL)]
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(*(summary.value(c, p) for p in v.panel_labels(summary)),
                *(summary.value(c, o) for o in others))].append(c)
    paths = []
    for gkey, gcells in groups.items():
        def coord(c: Cell, key: str) -> Any:
            value = c.flat.get(key, MISSING)
            return MISSING if value is None else value

        rows = sorted({coord(c, _HEAT_ROW) for c in gcells}, key=sort_key)
        cols = sorted({coord(c, _HEAT_COL) for c in gcells}, key=sort_key)
        bits = sorted({v.bits_of(summary, c) for c in gcells}, key=v.bits_order)
        grids = []
        for b in bits:
            grid = np.full((len(rows), len(cols)), np.nan)
            for c in gcells:
                if v.bits_of(summary, c) == b:
                    grid[rows.index(coord(c, _HEAT_ROW)), cols.index(coord(c, _HEAT_COL))] = c.top1_mean
            grids.append(grid)
        vmin, vmax = float(np.nanmin(grids)), float(np.nanmax(grids))
        fig = Figure(figsize=(1.6 + (0.9 * len(cols) + 0.8) * len(bits), 1.8 + 0.5 * len(rows)),
                     layout="constrained")
        axes = fig.subplots(1, len(bits), squeeze=False)[0]
        image = None
        for ax, b, grid in zip(axes, bits, grids):
            image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
            for (i, j), val in np.ndenumerate(grid):
                if not math.isnan(val):
                    ax.text(j, i, f"{val:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if val < (vmin + vmax) / 2 else "black")
            ax.set_xticks(range(len(cols)), [str(x) for x in cols])
            ax.set_yticks(range(len(rows)), [str(x) for x in rows])
            ax.set_xlabel("gamma")
            ax.set_title(v.bits_label(*b), fontsize=9)
        axes[0].set_ylabel("num_centroids")
        if image is not None:  # one panel per bit pair, at least one
            fig.colorbar(image, ax=list(axes), label="top-1 (%)")
        n_panel = len(v.panel_labels(summary))
        extra = [f"{o.split('.', 1)[-1]}={val}" for o, val in zip(others, gkey[n_panel:])]
        title = " · ".join([v.panel_title(summary, gkey[:n_panel]), *extra])
        fig.suptitle(f"SelectQ top-1: {title}", fontsize=9)
        suffix = "" if len(groups) == 1 else "_" + v.slug(title)
        paths.append(save(fig, out_dir / f"selectq_heatmap{suffix}.png"))
    return paths


def plot_variance(summary: Summary, out_dir: Path) -> list[Path]:
    """Histogram of random's per-seed top-1 (one subplot per bit-width with enough seeds), each
    other strategy's mean as a vertical line labelled with its percentile, its seeds as ticks."""
    from matplotlib.figure import Figure

    from calibbench.report.tables import variance_rows

    paths = []
    for panel, cells in v.panels(summary).items():
        rows = variance_rows(summary, cells)
        if not rows:
            continue
        fig = Figure(figsize=(5.2 * len(rows), 4.0), layout="constrained")
        axes = fig.subplots(1, len(rows), squeeze=False)[0]
        for ax, (b, ref, others) in zip(axes, rows):
            vals = np.array(list(ref.top1_by_seed.values()))
            ax.hist(vals, bins=min(20, max(5, len(vals) // 3)), color="lightgray", edgecolor="gray",
                    label=f"random ({ref.n} seeds)")
            colors = iter(["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"] * 4)
            top = ax.get_ylim()[1]
            for c, pct in others:
                color = next(colors)
                ax.axvline(c.top1_mean, color=color, linewidth=2,
                           label=f"{v.variant(summary, c)}: {c.top1_mean:.2f} (percentile {pct:.0f}, n={c.n})")
                ax.plot(list(c.top1_by_seed.values()), [top * 0.97] * c.n, "|", color=color,
                        markersize=12, markeredgewidth=2)
            ax.set_xlabel("top-1 (%)")
            ax.set_ylabel("random seeds")
            est = ", ".join(v.estimator_opts(ref))
            ax.set_title(v.bits_label(*b) + (f" · {est}" if est else ""), fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        fig.suptitle(f"Random calibration spread: {v.panel_title(summary, panel)}", fontsize=9)
        paths.append(save(fig, out_dir / f"variance_{v.slug(v.panel_title(summary, panel))}.png"))
    return paths


# Per-layer quantities a diagnostics figure shows: (json key, axis label, log scale).
def plot_diagnostics(summary: Summary, out_dir: Path) -> list[Path]:
    """Per panel, bit-width and range estimator where jobs wrote diagnostics.json: per-layer
    metrics averaged over each strategy's seeds, side by side (one line per strategy)."""
    paths = []
    for panel, cells in v.panels(summary).items():
        groups: dict[tuple, dict[str, list[dict]]] = defaultdict(dict)
        for c in cells:
            runs = list(load_diagnostics(summary.root, c))
            if runs:
                est = ", ".join(v.estimator_opts(c))
                name = v.strategy_label(summary, c)
                groups[(v.bits_of(summary, c), est)][f"{name} (n={len(runs)})"] = average_layers(runs)
        for (b, est), lines in sorted(groups.items(), key=lambda kv: (v.bits_order(kv[0][0]), kv[0][1])):
            title = f"{v.panel_title(summary, panel)} · {v.bits_label(*b)}" + (f" · {est}" if est else "")
            paths.append(layer_figure(lines, f"Diagnostics: {title}", out_dir / f"diagnostics_{v.slug(title)}.png"))
    return paths


def average_layers(runs: Sequence[dict]) -> list[dict]:
    """Mean of each numeric per-layer value over runs (same model: same layers in the same order)."""
    names = [layer["name"] for layer in runs[0]["layers"]]
    out = []
    for i, name in enumerate(names):
        per = [r["layers"][i] for r in runs if len(r["layers"]) > i and r["layers"][i]["name"] == name]
        merged: dict[str, Any] = {"name": name}
        for key, value in per[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                vals = [p[key] for p in per if isinstance(p.get(key), (int, float))]
                merged[key] = float(np.mean(vals)) if vals else None
        out.append(merged)
    return out
