"""Per-layer diagnostics: why one calibration set quantizes better than another.

One extra streamed pass (``diagnostics.enabled=true``, alias ``diagnostics=true`` on the command
line) over a fixed, seeded subset of the evaluation split — ``diagnostics.eval_images`` images
drawn with ``diagnostics.seed``, never with the run seed, so every strategy and seed sees the same
images. For each activation quantizer (the tensor a quantized layer actually clips and rounds):

- ``calib_lo`` / ``calib_hi``: the calibrated grid's representable range (``quantizer.range()``).
- ``eval_min`` / ``eval_max`` (exact) and ``eval_p001`` / ``eval_p999`` (0.1th / 99.9th
  percentile) of the values that reach the quantizer on the evaluation subset.
- ``clip_rate``: share of those values outside ``[calib_lo, calib_hi]`` (``clip_low_rate`` /
  ``clip_high_rate`` per side).
- ``range_inflation``: calibrated width ÷ evaluation percentile width (> 1: the grid is wider
  than the data needs, coarser steps; < 1: the grid clips the tail).
- ``snr_db``: 10·log10(Σ fp² / Σ (fp − q)²) of the layer's output, FP model vs fake-quant model
  on the same images (accumulated error of everything upstream plus this layer); and
  ``act_quant_snr_db``: the same for this quantizer alone (its input vs its output).

Assumptions, named: values are those entering the quantizer in the *fully quantized* model (what
deployment clips), not the weight-only-quantized model calibration observed; "outside the range"
means strictly beyond the grid's end points (values within half a step beyond still round to the
end point but are counted, since they saturate).

Memory: nothing of the whole subset is held. Per layer: exact counters, min/max and a
:class:`StreamingHistogram`; per batch: the FP model's activations of that batch (freed after the
quantized forward). Percentiles come from the histogram: within one bin width (recorded per layer
as ``percentile_error_bound``) of the inverse-CDF percentile, the value of rank ⌈q·n⌉ among the n
values (no interpolation between order statistics: in a sparse tail that could differ by more).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from calibbench import quant
from calibbench.cache import atomic_write_bytes
from calibbench.config import ConfigError
from calibbench.quant.modules import QuantAct
from calibbench.record import DIAGNOSTICS_FILE, FIGURE_FILE

log = logging.getLogger(__name__)

PERCENTILES = (0.001, 0.999)


def check(cfg: Any, split_size: int, split: str) -> None:
    """Bad input fails before any work: a subset must fit in the evaluation split."""
    n = cfg.eval_images
    if n <= 0 or n > split_size:
        raise ConfigError(f"diagnostics.eval_images={n} is out of range: the {split} split has "
                          f"{split_size} images; valid: 1..{split_size}")


def subset(split_indices: list[int], n: int, seed: int) -> list[int]:
    """``n`` indices of the evaluation split, a seeded draw independent of the run seed (sorted)."""
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(len(split_indices), generator=gen)[:n].sort().values
    return [split_indices[i] for i in pick.tolist()]


class StreamingHistogram:
    """``bins`` equal bins over ``[lo, lo + width)`` that grows by doubling.

    When a batch falls outside, the width doubles (upwards, or downwards by moving ``lo``) and
    adjacent bin pairs merge — exact, no count moves between bins — so the memory stays ``bins``
    counters whatever the data. A quantile is interpolated inside its bin: error ≤ ``bin_width``.
    """

    def __init__(self, bins: int, lo: float, hi: float) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins={bins}: need a power of two >= 2 (pairs merge when the range grows)")
        self.bins = bins
        self.lo = float(lo)
        self.width = max(float(hi) - float(lo), 1e-8)
        self.counts = torch.zeros(bins, dtype=torch.float64)

    @property
    def bin_width(self) -> float:
        return self.width / self.bins

    def _grow(self, up: bool) -> None:
        merged = self.counts.view(-1, 2).sum(dim=1)
        empty = torch.zeros_like(merged)
        self.counts = torch.cat([merged, empty] if up else [empty, merged])
        if not up:
            self.lo -= self.width
        self.width *= 2

    def add(self, x: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> None:
        """Count ``x`` (its min/max may be passed when already known)."""
        if x.numel() == 0:
            return
        if lo is None or hi is None:
            lo, hi = (float(v) for v in torch.aminmax(x))
        while hi >= self.lo + self.width:
            self._grow(up=True)
        while lo < self.lo:
            self._grow(up=False)
        # histc puts a value equal to max in the last bin; the top edge is exclusive here, and
        # growth above guarantees hi < lo + width, so nothing is dropped.
        self.counts += torch.histc(x.float(), self.bins, self.lo, self.lo + self.width).double()

    def quantile(self, q: float) -> float:
        total = float(self.counts.sum())
        if total == 0:
            return math.nan
        cum = torch.cumsum(self.counts, 0)
        target = q * total
        i = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)).clamp(max=self.bins - 1))
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = 0.0 if inside == 0 else min(1.0, max(0.0, (target - before) / inside))
        return self.lo + (i + frac) * self.bin_width


class _LayerStats:
    """Streamed reductions of one quantizer's input on the evaluation subset."""

    def __init__(self, name: str, kind: str, quantizer: Any, bins: int) -> None:
        lo, hi = (float(t.reshape(-1)[0]) for t in quantizer.range())
        self.name, self.kind, self.quantizer, self.lo, self.hi = name, kind, quantizer, lo, hi
        self.hist = StreamingHistogram(bins, lo, lo + 2 * (hi - lo))  # room for tails beyond hi
        self.n = self.below = self.above = 0
        self.vmin, self.vmax = math.inf, -math.inf
        self.sig_q = self.err_q = 0.0  # quantizer alone: input² and (output - input)²
        self.sig_fp = self.err_fp = 0.0  # layer output: FP² and (FP - fake-quant)²

    @torch.no_grad()
    def observe_input(self, x: Tensor) -> None:
        x = x.detach()
        lo, hi = (float(v) for v in torch.aminmax(x))
        self.vmin, self.vmax = min(self.vmin, lo), max(self.vmax, hi)
        self.n += x.numel()
        # Exact counts, but only where this batch reaches past an end (most layers, most batches
        # do not; a ReLU output never goes below 0).
        if lo < self.lo:
            self.below += int((x < self.lo).sum())
        if hi > self.hi:
            self.above += int((x > self.hi).sum())
        self.hist.add(x, lo, hi)
        err = self.quantizer.fake_quantize(x).sub_(x)
        self.sig_q += _sumsq(x)
        self.err_q += _sumsq(err)

    @torch.no_grad()
    def observe_output(self, out: Tensor, fp: Optional[Tensor]) -> None:
        if fp is None or fp.shape != out.shape:
            return
        self.sig_fp += _sumsq(fp)
        self.err_fp += _sumsq(fp.sub_(out))  # fp is this batch's private copy: consumed here

    def result(self) -> dict[str, Any]:
        p_lo, p_hi = (self.hist.quantile(q) for q in PERCENTILES)
        eval_width = p_hi - p_lo
        return {"name": self.name, "kind": self.kind, "bits": self.quantizer.bits,
                "calib_lo": self.lo, "calib_hi": self.hi, "eval_min": self.vmin, "eval_max": self.vmax,
                "eval_p001": p_lo, "eval_p999": p_hi, "percentile_error_bound": self.hist.bin_width,
                "clip_rate": (self.below + self.above) / max(1, self.n),
                "clip_low_rate": self.below / max(1, self.n), "clip_high_rate": self.above / max(1, self.n),
                "range_inflation": (self.hi - self.lo) / eval_width if eval_width > 0 else None,
                "snr_db": _db(self.sig_fp, self.err_fp), "act_quant_snr_db": _db(self.sig_q, self.err_q),
                "values": self.n}


def _sumsq(t: Tensor) -> float:
    """Σ t² as a BLAS dot (float32 accumulation per batch, summed across batches in float64:
    relative error ~1e-6, far below what a dB figure shows)."""
    flat = t.reshape(-1)
    return float(torch.dot(flat, flat))


def _db(signal: float, noise: float) -> Optional[float]:
    """10·log10(signal / noise); None when either is 0 (no data, or an exact match)."""
    if signal <= 0 or noise <= 0:
        return None
    return 10.0 * math.log10(signal / noise)


def _owner(path: str) -> str:
    """The quantized layer a quantizer belongs to: ``a.b.quantizer`` → ``a.b``."""
    return path.rsplit(".", 1)[0] if "." in path else path


@contextmanager
def _unfused(qmodel: nn.Module) -> Iterator[None]:
    """QuantAct's fused ReLU+quantize skips the quantizer's forward (and its hooks): off here."""
    acts = [m for m in qmodel.modules() if isinstance(m, QuantAct)]
    before = [m.fuse for m in acts]
    for m in acts:
        m.fuse = False
    try:
        yield
    finally:
        for m, f in zip(acts, before):
            m.fuse = f


def measure(fp_model: nn.Module, qmodel: nn.Module, batches: Any, device: torch.device,
            bins: int = 2048) -> dict[str, Any]:
    """Run ``batches`` of ``(images, labels)`` through both models with hooks; per-layer stats."""
    stats: dict[str, _LayerStats] = {}
    fp_at: dict[str, tuple[nn.Module, bool]] = {}  # quantizer path → (FP module, read its input?)
    fp_modules = dict(fp_model.named_modules())
    for path, kind, q in quant.quantizers(qmodel):
        if kind == "weight" or not q.active:
            continue
        owner = _owner(path)
        stats[path] = _LayerStats(owner, kind, q, bins)
        if owner in fp_modules:
            # QuantAct at P wraps the FP activation at P (its output); an input quantizer of the
            # quantized conv at P sees what the FP conv at P reads (its input).
            fp_at[path] = (fp_modules[owner], kind == "input")
    if not stats:
        raise ValueError("diagnostics: the model has no calibrated activation quantizer")
    store: dict[tuple[str, int], Tensor] = {}
    fp_calls: dict[str, int] = defaultdict(int)
    q_calls: dict[str, int] = defaultdict(int)
    correct = {"fp": 0, "quant": 0}
    seen = 0

    def fp_hook(path: str, read_input: bool):
        def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
            t = args[0] if read_input else output
            store[(path, fp_calls[path])] = t.detach().clone()  # later in-place ops must not reach it
            fp_calls[path] += 1
        return hook

    def q_pre(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            stats[path].observe_input(args[0])
        return hook

    def q_post(path: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            stats[path].observe_output(output, store.pop((path, q_calls[path]), None))
            q_calls[path] += 1
        return hook

    with ExitStack() as stack, _unfused(qmodel), torch.inference_mode():
        for path, (module, read_input) in fp_at.items():
            h = (module.register_forward_pre_hook(fp_hook(path, True)) if read_input
                 else module.register_forward_hook(fp_hook(path, False)))
            stack.callback(h.remove)
        for path, s in stats.items():
            stack.callback(s.quantizer.register_forward_pre_hook(q_pre(path)).remove)
            stack.callback(s.quantizer.register_forward_hook(q_post(path)).remove)
        fp_model.eval()
        qmodel.eval()
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            fp_calls.clear()
            q_calls.clear()
            correct["fp"] += int((fp_model(images).argmax(1) == labels).sum())
            correct["quant"] += int((qmodel(images).argmax(1) == labels).sum())
            store.clear()  # FP activations of a layer the quantized pass never reached
            seen += len(labels)
    return {"images": seen, "top1_fp": 100.0 * correct["fp"] / max(1, seen),
            "top1_quant": 100.0 * correct["quant"] / max(1, seen), "bins": bins,
            "layers": [s.result() for s in stats.values()]}


def run(fp_model: nn.Module, qmodel: nn.Module, data: Any, dataset: Any, indices: list[int],
        device: torch.device, cfg: Any, run_dir: Path, title: str) -> dict[str, Any]:
    """Measure, write ``diagnostics.json`` and ``diagnostics.png`` into ``run_dir``; return a
    short summary for result.json."""
    loader = data.loader(dataset, int(cfg.batch_size), indices)
    result = measure(fp_model, qmodel, loader, device, int(cfg.bins))
    from calibbench.cache import content_key

    result.update({"eval_images": len(indices), "subset_seed": int(cfg.seed),
                   "subset_key": content_key(list(indices)),
                   "percentiles": list(PERCENTILES), "title": title})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / DIAGNOSTICS_FILE, json.dumps(result, indent=2).encode())
    from calibbench.figures import layer_figure  # matplotlib only when asked for

    layer_figure({title: result["layers"]}, f"Diagnostics: {title} ({len(indices)} eval images)",
                 run_dir / FIGURE_FILE)
    layers = result["layers"]
    worst = max(layers, key=lambda layer: layer["clip_rate"])
    return {"file": DIAGNOSTICS_FILE, "figure": FIGURE_FILE, "eval_images": len(indices),
            "top1_fp": result["top1_fp"], "top1_quant": result["top1_quant"],
            "mean_clip_rate": sum(layer["clip_rate"] for layer in layers) / len(layers),
            "max_clip_rate": {"layer": worst["name"], "rate": worst["clip_rate"]}}
