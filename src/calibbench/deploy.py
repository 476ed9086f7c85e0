"""What a run ships: the saved quantized model state and its ONNX export, checked under onnxruntime.

- :func:`save_state` writes ``quant_state.pt`` (everything needed to rebuild the fake-quant model:
  weights after refinement, BN statistics, every quantizer's scale/zero point/bits, learned
  roundings as one bit per weight, the preset) atomically; its sha256 goes into ``result.json``.
- :func:`rebuild` turns a run folder back into the fake-quant model: the architecture from the
  run's config (random init, no weight download), ``quant.quantize`` with the run's preset, then
  the saved state. Refused with one :class:`~calibbench.quant.export.ExportError` naming the
  problem: a failed run, no state, a digest mismatch, a state for another model or weights.
- :func:`export_and_check` writes the ONNX model (``quant/export.py``: the exact form after
  ``exact_integer``, else the fused QDQ form; ``form`` in the record), runs it under
  onnxruntime's CPU provider on the run's evaluation split and returns the ``export.onnx`` record.
  The file appears under its final name only once it loaded and ran; nothing is left on failure.
- :func:`export_run` is ``python -m calibbench export RUN_DIR``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, cast

import torch
from omegaconf import OmegaConf
from torch import nn

from calibbench import datasets, models, quant
from calibbench.cache import atomic_write_bytes
from calibbench.config import ModelConfig, effective_bits
from calibbench.quant.adaround import attach
from calibbench.quant.export import (
    ExportError,
    compare,
    count_kernels,
    exact_integer,
    export_form,
    export_onnx,
    ort_session,
    snap_bias,
)
from calibbench.quant.modules import QuantConv2d, QuantLinear
from calibbench.record import RESULT_FILE, STATE_FILE

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
STATE_FORMAT = "calibbench.quant_state/1"
FORMATS = ("onnx",)
_ROUNDING = ".weight_rounding."


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def save_state(qmodel: nn.Module, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the fake-quant model's state to ``path`` (atomic); returns ``{file, sha256, bytes}``.

    Learned rounding is stored hardened: its ``up`` bits with the grid, floor and code bounds it
    was attached with (a few buffers per layer), so a rebuilt model rounds exactly as the run's did
    even when the weight quantizer's grid was re-initialised after the rounding was attached.
    """
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
             if not k.endswith(_ROUNDING + "V")}
    payload = {"format": STATE_FORMAT, "meta": meta, "info": quant.describe(qmodel),
               "state_dict": state}
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    atomic_write_bytes(path, body)
    return {"file": path.name, "sha256": _sha256(body), "bytes": len(body)}


def state_meta(cfg: Any, weights_id: str) -> dict[str, Any]:
    w_bits, a_bits = effective_bits(cfg)
    return {"model": cfg.model.name, "arch": cfg.model.arch, "weights_id": weights_id,
            "preset": cfg.quant.name, "w_bits": w_bits, "a_bits": a_bits}


def load_state(qmodel: nn.Module, payload: dict) -> None:
    """Install a saved state into a freshly quantized model of the same config."""
    state = payload["state_dict"]
    plain = {k: v for k, v in state.items() if _ROUNDING not in k}
    missing, unexpected = qmodel.load_state_dict(plain, strict=False)
    missing = [k for k in missing if _ROUNDING not in k]
    if missing or unexpected:
        raise ExportError(f"saved state does not fit the model built from the run's config: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    # The saved weight grids are the run's (e.g. reconstruction's MSE init, whose observer the
    # fresh model does not have): freeze them, so no weight observer recomputes them from the loaded
    # (or, in the exporter, copied) weights.
    for module in qmodel.modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            module.weight_quantizer.observer = None
            module._range_key = module._weight_key()
            module.invalidate_cache()
    for key, up in state.items():
        if not key.endswith(_ROUNDING + "up"):
            continue
        layer = qmodel.get_submodule(key[: -len(_ROUNDING + "up")])
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            raise ExportError(f"saved rounding {key!r} belongs to {type(layer).__name__}, not a quantized layer")
        rounding = attach(layer)
        prefix = key[: -len("up")]
        with torch.no_grad():
            for name in ("scale", "lo", "hi", "floor", "nearest"):
                if prefix + name in state:  # states saved before these were kept: recomputed
                    setattr(rounding, name, state[prefix + name].to(rounding.floor.device))
            rounding.up = up.to(rounding.floor.device).bool()
            rounding.V = None
        rounding.version += 1
        layer.invalidate_cache()


def read_run(run_dir: Path) -> dict:
    """The run's result record, refused unless it finished ok and saved its state."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        raise ExportError(f"{run_dir}: no {RESULT_FILE}; not a calibbench run folder")
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        raise ExportError(f"{run_dir}: the run did not finish (status {record.get('status')!r}: "
                          f"{record.get('error', 'no error recorded')}); nothing to export")
    if "quant_state" not in record or not (run_dir / STATE_FILE).is_file():
        raise ExportError(f"{run_dir}: no saved quantized model ({STATE_FILE}); rerun it with this "
                          f"version of calibbench (every ok run saves one)")
    return record


def rebuild(run_dir: Path, record: dict) -> tuple[Any, nn.Module, dict]:
    """``(cfg, qmodel, payload)`` of a finished run, checked against its record."""
    body = (run_dir / STATE_FILE).read_bytes()
    want = record["quant_state"]["sha256"]
    if _sha256(body) != want:
        raise ExportError(f"{run_dir / STATE_FILE}: sha256 {_sha256(body)[:16]}… does not match "
                          f"{want[:16]}… in {RESULT_FILE}; the file was changed or truncated")
    payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
    if payload.get("format") != STATE_FORMAT:
        raise ExportError(f"{run_dir / STATE_FILE}: unknown format {payload.get('format')!r}")
    cfg = OmegaConf.create(record["config"])
    meta = payload["meta"]
    expected = state_meta(cfg, record["model"]["weights_id"])
    if meta != expected:
        diff = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        raise ExportError(f"{run_dir / STATE_FILE}: state was saved for another model or weights "
                          f"than the run's config: {diff} (saved, config)")
    model_cfg = cast(ModelConfig, OmegaConf.merge(cfg.model, {"weights": "none"}))  # a DictConfig on the schema
    structure = models.build(model_cfg, cfg.dataset.name,
                             cfg.paths.weights_dir).module
    w_bits, a_bits = effective_bits(cfg)
    qmodel = quant.quantize(structure, cfg.quant, w_bits, a_bits)
    load_state(qmodel, payload)
    return cfg, qmodel.eval(), payload


def export_and_check(qmodel: nn.Module, out: Path, batches: list, fmt: str = "onnx",
                     threads: Optional[int] = None) -> dict[str, Any]:
    """Export to ``out``, run it under onnxruntime on ``batches`` and return the record."""
    import onnxruntime

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    optimized = out.with_name(f".{out.name}.ort.tmp")
    try:
        info = export_onnx(qmodel, batches[0][0][:1], str(tmp))
        session = ort_session(str(tmp), threads or torch.get_num_threads(), str(optimized))
        kernels = count_kernels(str(optimized))
        check = compare(qmodel, session, batches)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        optimized.unlink(missing_ok=True)
    return {"path": str(out), **check, **export_form(qmodel, kernels["ops"]),
            "qlinear_nodes": kernels["qlinear_nodes"], "float_conv_nodes": kernels["float_conv_nodes"],
            "ops": kernels["ops"], **info,
            "onnxruntime": onnxruntime.__version__, "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - start, 3)}


def eval_batches(data: datasets.DataModule, dataset: Any, indices: list[int], batch_size: int) -> list:
    return list(data.loader(dataset, batch_size, indices))


def export_run(run_dir: str | Path, fmt: str = "onnx", out: Optional[str | Path] = None,
               exact: Optional[bool] = None) -> dict:
    """``python -m calibbench export RUN_DIR``: rebuild, export, check, record in result.json.

    ``exact``: the bit-exact graph (True) or the fused QDQ graph (False); None: the run's own
    ``export_exact`` (true for runs saved before the option existed, the default)."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    cfg, qmodel, _ = rebuild(run_dir, record)
    data = datasets.build(cfg.dataset, cfg.model)
    eval_set, eval_idx = data.eval_set(cfg.eval_split, cfg.budget.eval_limit)
    batches = eval_batches(data, eval_set, eval_idx, cfg.budget.eval_batch_size)
    snapped = record["quant"].get("int32_bias_layers")
    if snapped is None:  # saved by a run without export: snap now, and say what that changed
        snapped = snap_bias(qmodel, batches[0][0][:1])
    if exact is None:
        exact = bool(cfg.get("export_exact", True))
    if exact:  # the integer layers are not saved state: rebuilt from the weights and grids (deterministic)
        exact_integer(qmodel, batches[0][0][:1])
    entry = export_and_check(qmodel, Path(out) if out else run_dir / ONNX_FILE, batches, fmt, cfg.threads)
    entry["int32_bias_layers"] = snapped
    entry["run_top1"] = record["metrics"]["quant"]["top1"]
    record.setdefault("export", {})[fmt] = entry
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(record, indent=2, default=float).encode())
    return entry
