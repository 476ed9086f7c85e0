"""The per-layer diagnostics figure, shared by one run's diagnostics (``diagnostics.py``) and a
sweep's report (``report/plots.py``), and the PNG writer both use. It sits below both so that a
stage never imports the report (tests/test_layers.py). matplotlib is imported only when drawing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save(fig: Any, path: Path) -> Path:
    """Render through a temp file so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


LAYER_METRICS = (("clip_rate", "clipping rate\n(eval values outside\nthe calibrated range)", True),
                 ("range_inflation", "range inflation\n(calibrated width /\neval 0.1–99.9 pct width)", False),
                 ("snr_db", "output SNR,\nFP vs fake-quant (dB)", False))


def layer_figure(lines: dict[str, list[dict]], title: str, path: Path) -> Path:
    """One subplot per LAYER_METRICS entry plus calibrated vs evaluation ranges, x = quantized layer
    (in forward order), one line per entry of ``lines`` (name → per-layer dicts)."""
    from matplotlib.figure import Figure

    names = max(lines.values(), key=len)
    n_layers = len(names)
    fig = Figure(figsize=(max(7.0, 0.28 * n_layers + 3), 11.0), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    for i, (key, ylabel, log) in enumerate(LAYER_METRICS):
        ax = axes[i]
        for name, layers in lines.items():
            ys = [np.nan if (y := layer.get(key)) is None else float(y) for layer in layers]
            if log:
                ys = [y if y > 0 else np.nan for y in ys]  # 0 clipping cannot sit on a log axis
            ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel + ("\n(0 not drawn)" if log else ""), fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[3]
    for j, (name, layers) in enumerate(lines.items()):
        xs = np.arange(len(layers)) + (j - (len(lines) - 1) / 2) * 0.8 / max(1, len(lines))
        ax.errorbar(xs, [layer["calib_hi"] for layer in layers], fmt="_", markersize=8, color=f"C{j}",
                    label=f"{name}: calibrated max")
        ax.plot(xs, [layer["eval_p999"] for layer in layers], "x", color=f"C{j}", markersize=4,
                label=f"{name}: eval 99.9th pct")
    ax.set_ylabel("activation value", fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_xticks(range(n_layers), [layer["name"] for layer in names], rotation=90, fontsize=6)
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
