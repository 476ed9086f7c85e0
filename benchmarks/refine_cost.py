"""Cost of one refinement step relative to the same step in full precision (goal: ratio <= 1.5).

    python benchmarks/refine_cost.py                  # resnet20 / CIFAR batch of 64, W4A4
    python benchmarks/refine_cost.py --batch-size 200 --bits 3

Refinement step (numerator): ``DistillModule.compute`` of ``refine=kd`` on one batch — teacher
forward (no grad), student forward through the fake-quant layers, KD loss — then backward through
the straight-through estimator. Reference (denominator): the very same module and loss with a
full-precision copy of the model as the student, i.e. one plain FP forward+backward plus one FP
forward. Both run on the same batch of real train images, interleaved (FP, Q, FP, Q, ...) so
background load hits both alike; the best of ``--repeats`` rounds of ``--steps`` steps is reported
(the median too). The optimizer step is left out of both (it is the same for both models).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _common import compose, fp_data_calib, offline_env

GOAL = 1.5



def _timed_steps(module: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    """Seconds per step: compute every term, backward, clear the gradients."""
    start = time.perf_counter()
    for _ in range(steps):
        values = module.compute(x)
        sum(values.values()).backward()
        module.student.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (budget=cpu: 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and model")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--preset", default="dfq_legacy")
    parser.add_argument("--calib", type=int, default=256, help="calibration images from train")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    offline_env()
    from calibbench import quant
    from calibbench.refine.distill import DistillModule
    from calibbench.refine.losses import build_terms

    cfg = compose(f"quant={args.preset}", f"bits={args.bits}", "refine=kd")
    fp, data, calib_x = fp_data_calib(cfg, args.calib)
    qmodel = quant.quantize(fp, cfg.quant, args.bits, args.bits)
    quant.calibrate(qmodel, calib_x.split(64), "cpu")
    x = calib_x[: args.batch_size]
    fp.requires_grad_(False)
    terms = build_terms(cfg.refine)
    runs = {"fp": DistillModule(copy.deepcopy(fp).requires_grad_(True), fp, terms, cfg.refine, 1).train(),
            "quant": DistillModule(qmodel, fp, terms, cfg.refine, 1).train()}
    info = quant.describe(qmodel)
    print(f"resnet20 {tuple(x.shape)} batch, refine=kd (terms {[t for t, _, _ in terms]}), "
          f"bn={cfg.refine.bn}; quantized: preset={info['preset']} W{info['w_bits']}A{info['a_bits']}, "
          f"calibrated on {len(calib_x)} train images; threads={args.threads}")

    times: dict[str, list[float]] = {k: [] for k in runs}
    for module in runs.values():  # warm-up
        _timed_steps(module, x, 1)
    for _ in range(args.repeats):
        for key, module in runs.items():
            times[key].append(_timed_steps(module, x, args.steps))

    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    for key in runs:
        print(f"{key:6s} step: best {1000 * best[key]:8.1f} ms   median {1000 * median[key]:8.1f} ms")
    ratio, ratio_med = best["quant"] / best["fp"], median["quant"] / median["fp"]
    print(f"quant/FP median {ratio_med:.3f}; goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")
    print(f"ratio {ratio:.3f}")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
