"""onnxruntime int8 (W8A8 dfq_legacy; the exact form that export=onnx ships and the QDQ form) vs
onnxruntime FP32 vs PyTorch FP32, in one run.

Latency (median ms per batch) and throughput (images/s) at batch 1 and 64 for resnet20, resnet56
(CIFAR, 32x32) and mobilenetv3 (ImageNet, 224x224), 1 thread, interleaved repeats; the ratios are
taken within the run. Weights are random (speed does not depend on their values); activation
ranges are calibrated on random inputs. Prints whether the CPU has VNNI (onnxruntime's u8s8/u8u8
kernels use it when present).

    python benchmarks/export_speed.py [--models resnet20_cifar10,...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from calibbench import models, quant
from calibbench.quant.export import count_kernels, exact_integer, export_onnx, ort_session, snap_bias
from calibbench.store import register_configs


def vnni() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    found = sorted({f for f in flags if "vnni" in f})
    return ", ".join(found) if found else "no"


def compose(model: str):
    from hydra import compose as hc
    from hydra import initialize_config_module

    with initialize_config_module("calibbench.conf", version_base="1.3"):
        return hc("config", [f"model={model}", "model.weights=none", "logger.mode=disabled"])


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20_cifar10,resnet56_cifar10,mobilenetv3")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    torch.set_num_threads(1)
    register_configs()
    print(f"CPU VNNI flags: {vnni()}; torch {torch.__version__}, 1 thread")
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for name in args.models.split(","):
        cfg = compose(name)
        fp = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir).module.eval()
        size = int(cfg.model.input_size)
        calib = torch.randn(16, 3, size, size)
        q = quant.quantize(fp, cfg.quant, 8, 8)
        quant.calibrate(q, [calib])
        snap_bias(q, calib[:1])
        int8_path, fp_path = tmp / f"{name}_int8.onnx", tmp / f"{name}_fp32.onnx"
        export_onnx(q, calib[:1], str(int8_path))
        exact = copy.deepcopy(q)
        exact_integer(exact, calib[:1])
        exact_path = tmp / f"{name}_exact.onnx"
        export_onnx(exact, calib[:1], str(exact_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fp, (calib[:1],), str(fp_path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        s_int8 = ort_session(str(int8_path), 1, str(tmp / "opt.onnx"))
        kernels = count_kernels(str(tmp / "opt.onnx"))
        s_fp = ort_session(str(fp_path), 1)
        s_exact = ort_session(str(exact_path), 1)
        for bs in map(int, args.batches.split(",")):
            x = torch.randn(bs, 3, size, size)
            xn = x.numpy()
            t = {"ort_int8": [], "ort_exact": [], "ort_fp32": [], "torch_fp32": []}
            for _ in range(2):  # interleaved: machine load hits all alike
                t["ort_int8"].append(timed(lambda: s_int8.run(None, {"input": xn}), args.repeats))
                t["ort_exact"].append(timed(lambda: s_exact.run(None, {"input": xn}), args.repeats))
                t["ort_fp32"].append(timed(lambda: s_fp.run(None, {"input": xn}), args.repeats))
                with torch.inference_mode():
                    t["torch_fp32"].append(timed(lambda: fp(x), args.repeats))
            med = {k: min(v) for k, v in t.items()}
            rows.append((name, bs, med, kernels["qlinear_nodes"], kernels["float_conv_nodes"]))
            print(f"{name:18s} batch {bs:3d}: ORT int8 QDQ {1e3 * med['ort_int8']:8.2f} ms  exact "
                  f"{1e3 * med['ort_exact']:8.2f} ms  ORT fp32 "
                  f"{1e3 * med['ort_fp32']:8.2f} ms  torch fp32 {1e3 * med['torch_fp32']:8.2f} ms  | "
                  f"int8/ORT-fp32 speed-up {med['ort_fp32'] / med['ort_int8']:.2f}x, int8/torch "
                  f"{med['torch_fp32'] / med['ort_int8']:.2f}x  | {bs / med['ort_int8']:.0f} img/s int8  "
                  f"({kernels['qlinear_nodes']} QLinear / {kernels['float_conv_nodes']} float conv nodes)",
                  flush=True)
    print("\n| model | batch | ORT int8 QDQ ms | ORT int8 exact ms | ORT fp32 ms | torch fp32 ms | int8 img/s "
          "| speed-up vs ORT fp32 | vs torch fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, bs, med, _, _ in rows:
        print(f"| {name} | {bs} | {1e3 * med['ort_int8']:.2f} | {1e3 * med['ort_exact']:.2f} | "
              f"{1e3 * med['ort_fp32']:.2f} | "
              f"{1e3 * med['torch_fp32']:.2f} | {bs / med['ort_int8']:.0f} | "
              f"{med['ort_fp32'] / med['ort_int8']:.2f}x | {med['torch_fp32'] / med['ort_int8']:.2f}x |")


if __name__ == "__main__":
    main()
