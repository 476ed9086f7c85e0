"""Which rounding learning rate at budget=cpu: unit losses of refine=qdrop with lr 1e-3 vs 1e-2.

    python benchmarks/recon_lr_check.py 300 0.001 0.01     # iterations per unit, then the rates

resnet20, W3A3 dfq_legacy, 256 train images (spread over the train split, not the test set),
four units reconstructed in turn (stem, stage1.unit1, stage2.unit1, stage3.unit1; each on the
output of the ones before it), batch 32. Prints each unit's reconstruction loss on the calibration
images before and after, the share of weights rounded away from nearest and the seconds. The
decision criterion is the calibration loss the method itself minimises, never test accuracy.
Last line: summed loss after reconstruction at the last rate ÷ at the first rate.
"""

from __future__ import annotations

import copy
import sys

import torch
from _common import compose, fp_data_calib, offline_env


def main(argv: list[str]) -> int:
    iters = int(argv[0]) if argv else 300
    lrs = argv[1:] or ["0.001", "0.01"]
    torch.set_num_threads(1)
    offline_env()
    from calibbench import quant
    from calibbench.quant.switches import quantization_off
    from calibbench.refine.recon import reconstruct_unit
    from calibbench.refine.units import build_units

    cfg = compose("bits=3", "refine=qdrop")
    fp, _, images = fp_data_calib(cfg, 256)
    q0 = quant.quantize(fp, cfg.quant, 3, 3)
    quant.calibrate(q0, images.split(64), "cpu")
    q0.requires_grad_(False)
    totals = []
    for lr in lrs:
        q = copy.deepcopy(q0)
        with torch.no_grad(), quantization_off(q):
            units, _ = build_units(q, "block", images[:1])
        c = compose("bits=3", "refine=qdrop", f"refine.lr={lr}").refine
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        total = 0.0
        for u in [units[0], units[1], units[4], units[7]]:
            r = reconstruct_unit(q, u, images, c, iters, 32, torch.device("cpu"), g, "qdrop")
            total += r["loss_end"]
            print(lr, u.name, round(r["loss_start"], 4), round(r["loss_end"], 4),
                  round(r["changed_share"], 3), r["seconds"], flush=True)
        totals.append(total)
    print(f"ratio {totals[-1] / totals[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
