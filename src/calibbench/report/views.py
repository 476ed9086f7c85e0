"""How cells are grouped and named for display: panels (one comparison each), row labels, bits.

A panel is every key column but the row (strategy and refine, with their swept fields, and the
range estimator) and the bits; refinement is part of the row so that ``random`` and
``random + refine=kd`` (and a generator strategy with its own refinement) sit in one table, and
the estimator is part of it so that strategies under min/max and under MSE sit in one table too.
A row names every estimator setting that differs from its quantizer preset's default (the YAML in
``conf/quant/``), whether or not it varies in the folder: a table of MSE-calibrated runs never
reads like one of the preset's min/max. Shared by tables and plots.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from calibbench.report.load import (
    BITS,
    DEVIATIONS,
    ESTIMATOR_FIELDS,
    MISSING,
    REFINE,
    STRATEGY,
    Cell,
    Summary,
    sort_key,
)

REFERENCE = "random"  # the strategy every other one is compared with


def in_group(column: str, group: str) -> bool:
    return column == group or column.startswith(f"{group}.")


def panel_labels(summary: Summary) -> list[str]:
    return [c for c in summary.columns if c not in BITS and c not in ESTIMATOR_FIELDS
            and not any(in_group(c, g) for g in (STRATEGY, REFINE))]


@functools.lru_cache(maxsize=None)
def preset_defaults(preset: str) -> dict[str, Any]:
    """``quant.<field>`` → the value preset ``preset`` gives it (its YAML over the schema)."""
    from omegaconf import OmegaConf

    from calibbench.config import QuantConfig

    out = {f"quant.{f.name}": f.default for f in dataclasses.fields(QuantConfig)
           if f.default is not dataclasses.MISSING}
    path = Path(__file__).resolve().parents[1] / "conf" / "quant" / f"{preset}.yaml"
    if path.is_file():
        data = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(data, dict):  # a preset file is a mapping
            out.update({f"quant.{str(k)}": val for k, val in data.items() if k != "defaults"})
    return out


def estimator_opts(cell: Cell) -> list[str]:
    """``["act_observer=mse", "observer_reduce=pooled"]``: the cell's estimator settings that
    differ from its preset's defaults (only those the run read: load._estimator_fields)."""
    defaults = preset_defaults(str(cell.flat.get("quant.name", "")))
    return [f"{key.split('.', 1)[1]}={cell.flat[key]}" for key in ESTIMATOR_FIELDS
            if key in cell.flat and cell.flat[key] != defaults.get(key, MISSING)]


def estimator(cell: Cell) -> tuple:
    """The cell's full estimator setting (the identity a paired or spread comparison must share)."""
    return tuple(cell.flat.get(key, MISSING) for key in ESTIMATOR_FIELDS)


def strategy_labels(summary: Summary) -> list[str]:
    return [c for c in summary.columns if in_group(c, STRATEGY)]


def refine_labels(summary: Summary) -> list[str]:
    return [c for c in summary.columns if in_group(c, REFINE)]


def refine_name(summary: Summary, cell: Cell) -> Any:
    return summary.value(cell, REFINE) if REFINE in summary.columns else cell.flat.get("refine.name", "none")


def variant(summary: Summary, cell: Cell) -> str:
    """'selectq (num_centroids=5, gamma=1.0)': the strategy and its swept fields; a setting that
    departs from the paper's reading is named as such: 'selectq (select=lowest, not the paper's
    reading)'. A refiner (and its swept options) follows: '+ refine=kd (lr=0.001)'."""
    name, *fields = strategy_labels(summary)
    opts = [f"{f.split('.', 1)[1]}={summary.value(cell, f)}" for f in fields
            if summary.value(cell, f) != MISSING]
    for dev in filter(None, str(cell.flat.get(DEVIATIONS) or "").split(", ")):
        note = f"{dev}, not the paper's reading"
        opts = [note if o == dev else o for o in opts] if dev in opts else [*opts, note]
    text = f"{summary.value(cell, name)}" + (f" ({', '.join(opts)})" if opts else "")
    refine = refine_labels(summary)
    # The refiner's name is a column only when it varies; a swept refine option (refine.lr) must
    # still name the row, or cells at different rates would share one.
    name_r = refine_name(summary, cell)
    if refine and name_r not in ("none", MISSING, None):
        r_opts = [f"{f.split('.', 1)[1]}={summary.value(cell, f)}" for f in refine
                  if f != REFINE and summary.value(cell, f) != MISSING]
        text += f" + refine={name_r}" + (f" ({', '.join(r_opts)})" if r_opts else "")
    est = estimator_opts(cell)
    return text + (f" · {', '.join(est)}" if est else "")


def is_reference(summary: Summary, cell: Cell) -> bool:
    """Plain random calibration (no strategy option, no refinement), under any estimator."""
    if summary.value(cell, STRATEGY) != REFERENCE or refine_name(summary, cell) not in ("none", MISSING, None):
        return False
    return all(summary.value(cell, f) == MISSING for f in strategy_labels(summary)[1:])


def strategy_label(summary: Summary, cell: Cell) -> str:
    """The row label without the estimator part: for tables and figures that set estimators apart
    in columns or titles."""
    return variant(summary, cell).split(" · ")[0]


def bits_of(summary: Summary, cell: Cell) -> tuple[Any, Any]:
    return summary.value(cell, "w_bits"), summary.value(cell, "a_bits")


def bits_label(w: Any, a: Any) -> str:
    return f"W{w}A{a}"


def bits_order(bits: tuple[Any, Any]) -> tuple:
    return sort_key(bits[0]), sort_key(bits[1])


def row_order(summary: Summary, cell: Cell) -> tuple:
    """Within a panel: by estimator (the preset's default first), then by strategy (and its
    fields), the calibration-only row first, then the refined ones."""
    est = (len(estimator_opts(cell)) > 0, tuple(sort_key(v) for v in estimator(cell)))
    strategy = tuple(sort_key(summary.value(cell, c)) for c in strategy_labels(summary))
    refine = summary.value(cell, REFINE) if REFINE in summary.columns else "none"
    rest = tuple(sort_key(v) for v in cell.key)
    return (est, *strategy, refine not in ("none", MISSING), rest)


def panels(summary: Summary) -> dict[tuple, list[Cell]]:
    labels = panel_labels(summary)
    out: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in sorted(summary.cells, key=lambda c: row_order(summary, c)):
        out[tuple(summary.value(cell, c) for c in labels)].append(cell)
    return out


def panel_title(summary: Summary, panel: tuple) -> str:
    parts = []
    for column, value in zip(panel_labels(summary), panel):
        if column == "budget":
            parts.append(f"budget {value}")
        elif column == "num_samples":
            parts.append(f"{value} samples")
        elif column in ("dataset", "model", "quant"):
            parts.append(str(value))
        else:
            parts.append(f"{column}={value}")
    return " · ".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:120]


def reference_cell(summary: Summary, cell: Cell) -> Optional[Cell]:
    """The ``random`` cell at the same everything-but-strategy (panel, bits, refine and its
    options): the partner of a paired comparison. None when there is none, or several (random's
    own swept fields, e.g. class_balanced, would make the choice arbitrary)."""
    strat = set(strategy_labels(summary))
    others = [i for i, c in enumerate(summary.columns) if c not in strat]
    want = tuple(cell.key[i] for i in others)
    found = [c for c in summary.cells if summary.value(c, STRATEGY) == REFERENCE and c is not cell
             and tuple(c.key[i] for i in others) == want]
    return found[0] if len(found) == 1 else None
