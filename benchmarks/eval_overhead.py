"""Evaluation throughput of a fake-quant model relative to its FP model (goal: ratio >= 0.8).

    python benchmarks/eval_overhead.py              # whole cifar10_jpeg test set (10,000 images)
    python benchmarks/eval_overhead.py --limit 1024 # quick run

Test images are decoded once into batches before timing, so JPEG decoding is not measured; only
``model(batch)`` under ``torch.inference_mode`` is. FP and quantized passes over the same batches
are interleaved (FP, Q, FP, Q, ...) so background load hits both alike; the best pass of each is
reported (the median too). The quantized model is ``quant=dfq_legacy`` W4A4 (by default)
calibrated on 256 train images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
from _common import compose, fp_data_calib, offline_env


def _timed_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - start


def _accuracy(model: torch.nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(batches, labels))
    return 100.0 * correct / sum(len(y) for y in labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N test images (spread over classes)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--preset", default="dfq_legacy")
    parser.add_argument("--calib", type=int, default=256, help="calibration images from train")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    offline_env()
    from calibbench import datasets, quant

    cfg = compose(f"quant={args.preset}", f"bits={args.bits}")
    fp, data, _ = fp_data_calib(cfg)

    t0 = time.perf_counter()
    n_val = len(data.test)
    idx = datasets.spread_indices(n_val, args.limit)
    images, targets = data.load(idx, "val", batch_size=args.batch_size)
    batches = list(images.split(args.batch_size))
    labels = list(targets.split(args.batch_size))
    print(f"decoded {len(images)} test images into {len(batches)} batches of {args.batch_size} "
          f"in {time.perf_counter() - t0:.1f} s (decoding is NOT part of the timings below)")

    calib_x, _ = data.load(datasets.spread_indices(len(data.train), args.calib), "train")
    qmodel = quant.quantize(fp, cfg.quant, args.bits, args.bits)
    quant.calibrate(qmodel, calib_x.split(64), "cpu")
    qmodel.eval()
    info = quant.describe(qmodel)
    print(f"quantized: preset={info['preset']} W{info['w_bits']}A{info['a_bits']}, "
          f"{info['num_weight_quantizers']} weight / {info['num_act_quantizers']} act quantizers, "
          f"calibrated on {len(calib_x)} train images; threads={args.threads}")

    times: dict[str, list[float]] = {"fp": [], "quant": []}
    runs: dict[str, Callable] = {"fp": fp, "quant": qmodel}
    with torch.inference_mode():
        acc = {k: _accuracy(m, batches, labels) for k, m in runs.items()}  # also the warm-up
        for _ in range(args.repeats):
            for key, model in runs.items():
                times[key].append(_timed_pass(model, batches))

    n = len(images)
    best = {k: n / min(v) for k, v in times.items()}
    median = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"top-1: FP {acc['fp']:.2f}%  quant {acc['quant']:.2f}%  ({n} images)")
    print(f"FP     images/s: best {best['fp']:8.1f}   median {median['fp']:8.1f}")
    print(f"quant  images/s: best {best['quant']:8.1f}   median {median['quant']:8.1f}")
    ratio, ratio_med = best["quant"] / best["fp"], median["quant"] / median["fp"]
    print(f"ratio quant/FP:  best {ratio:.3f}   median {ratio_med:.3f}   (goal >= 0.8: "
          f"{'met' if ratio >= 0.8 else 'NOT met'})")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
