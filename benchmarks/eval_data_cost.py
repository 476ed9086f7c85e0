"""Where a CIFAR evaluation's time goes: JPEG decoding, the per-image transform, the fake-quant
forward pass, as shares measured in one run (one thread, like a sweep job on 2 cores).

    python benchmarks/eval_data_cost.py              # 4,000 cifar10_jpeg test images
    python benchmarks/eval_data_cost.py --limit 10000

This decides whether caching decoded images is worth it (issue 24 assumed the decode was most of a
sweep job): decode = ``load_rgb`` (PIL open + RGB convert), transform = the dataset's own
ToTensor + Normalize, forward = the quantized resnet20 (W4A4, 256 calibration images) over the same
images in batches of 256 under ``torch.inference_mode``. In a real evaluation the first two run in
the DataLoader's worker processes, beside the forward pass.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import compose, fp_data_calib, offline_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=4000)
    args = parser.parse_args(argv)
    offline_env()
    torch.set_num_threads(1)

    from calibbench import quant
    from calibbench.datasets import load_rgb

    cfg = compose("bits=4")
    fp, data, calib = fp_data_calib(cfg, 256)
    qmodel = quant.quantize(fp, cfg.quant, 4, 4).eval()
    quant.calibrate(qmodel, calib.split(64))
    folder, idx = data.eval_set("test", args.limit)
    paths = [folder.samples[i][0] for i in idx]

    start = time.perf_counter()
    images = [load_rgb(p) for p in paths]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    tensors = [folder.transform(im) for im in images]
    transform = time.perf_counter() - start
    batches = torch.stack(tensors).split(256)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            qmodel(x)
    forward = time.perf_counter() - start
    total = decode + transform + forward
    print(f"{len(idx)} test images, 1 torch thread")
    for name, sec in (("JPEG decode", decode), ("ToTensor + Normalize", transform), ("fake-quant forward", forward)):
        print(f"  {name:22s} {sec:7.2f} s  {1000 * sec / len(idx):6.3f} ms/image  {100 * sec / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
