"""Cost of one reconstruction iteration of a resnet20 block relative to its plain float step (goal: <= 1.5, issue 21).

    python benchmarks/recon_cost.py                       # refine=qdrop, W4A4, stage1.unit1, batch 32
    python benchmarks/recon_cost.py --refine brecq --stage activations --unit features.stage3.unit1

``--stage`` picks the stage of the refiner's procedure (``weights``: the rounding, and in QDrop's
joint procedure the activation steps too; ``activations``: BRECQ's second stage, the activation
step sizes alone with the Lp loss). BRECQ's weights stage runs with activation quantization off in
the whole model, as in the pipeline.

Numerator: :meth:`UnitTrainer.step` of ``refine/recon.py`` on the unit — a random batch of the
cached unit inputs/targets, QDrop's input mixing, the block's forward with soft-rounded weights
and (learned, dropped) activation quantizers, loss + rounding regulariser (after the warm-up; the
benchmark times steps after it), backward, Adam steps for V and the activation ranges.
Denominator: the same block in full precision (a deep copy of the FP model's block, weights
trainable) on the same batch: forward, the same output loss, backward, one Adam step over its
weights. Both interleaved (FP, recon, FP, recon, ...) so background load hits both alike; the best
of ``--repeats`` rounds of ``--steps`` steps is reported (the median too).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time

import torch
from _common import compose, fp_data_calib, offline_env

GOAL = 1.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refine", default="qdrop", choices=["adaround", "brecq", "qdrop"])
    parser.add_argument("--unit", default="features.stage1.unit1",
                        help="unit in resnet20: a block path, or (adaround) the first layer under it")
    parser.add_argument("--batch-size", type=int, default=32, help="budget.refine_unit_batch_size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib", type=int, default=256, help="calibration images from train")
    parser.add_argument("--stage", default="weights", choices=["weights", "activations"],
                        help="the stage of refine.procedure to time (activations: brecq only)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    offline_env()
    from calibbench import quant, runtime
    from calibbench.quant.switches import activations_off, quantization_off
    from calibbench.refine.recon import UnitTrainer, recon_loss, stages_for, unit_data
    from calibbench.refine.units import build_units

    runtime.configure(torch.device("cpu"))  # as pipeline.run does (both sides share the process)
    cfg = compose(f"bits={args.bits}", f"refine={args.refine}")
    fp, _, images = fp_data_calib(cfg, args.calib)
    qmodel = quant.quantize(fp, cfg.quant, args.bits, args.bits)
    quant.calibrate(qmodel, images.split(64), "cpu")
    qmodel.requires_grad_(False)
    with torch.no_grad(), quantization_off(qmodel):
        units, _ = build_units(qmodel, cfg.refine.granularity, images[:1])
    unit = next(u for u in units if args.unit in u.paths or u.name == args.unit
                or any(p.startswith(args.unit + ".") for p in u.paths))
    steps_total = 10_000  # far past the warm-up: the regulariser is part of every timed step
    stages = {s.name: s for s in stages_for(cfg.refine, cfg.budget, steps_total)}
    if args.stage not in stages:
        parser.error(f"--stage {args.stage}: refine={args.refine} runs only {', '.join(stages)}")
    stage = dataclasses.replace(stages[args.stage], steps=steps_total)
    scope = contextlib.ExitStack()
    if args.stage == "weights" and len(stages) > 1:
        scope.enter_context(activations_off(qmodel))  # BRECQ's stage 1: act_quant=False in the whole model
    gen = torch.Generator().manual_seed(0)
    udata = unit_data(qmodel, unit, images, cfg.refine, args.batch_size, torch.device("cpu"), stage)
    trainer = UnitTrainer(qmodel, unit, udata, cfg.refine, stage, args.batch_size, gen, args.refine)

    block = [copy.deepcopy(fp.get_submodule(p)).requires_grad_(True) for p in unit.paths]
    fp_opt = torch.optim.Adam([p for m in block for p in m.parameters()], lr=1e-3)
    x_fp, _, target, _ = udata.get(torch.arange(args.batch_size))

    def fp_steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = recon_loss(unit.run(block, x_fp), target, p=stage.p)
            fp_opt.zero_grad(set_to_none=True)
            loss.backward()
            fp_opt.step()
        return (time.perf_counter() - start) / n

    it = [int(0.5 * steps_total)]

    def recon_steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            trainer.step(it[0])
            it[0] += 1
        return (time.perf_counter() - start) / n

    print(f"resnet20 unit {unit.paths} ({unit.kind}, {len(trainer.layers)} layers), refine={args.refine} "
          f"stage {stage.name} (rounding={stage.rounding}, learn_act={stage.learn_act}, drop={stage.drop}, "
          f"p={stage.p}, "
          f"fisher={cfg.refine.fisher}), W{args.bits}A{args.bits} {cfg.quant.name}, batch "
          f"{args.batch_size}, unit data cached={udata.__class__.__name__}, threads={args.threads}")
    times: dict[str, list[float]] = {"fp": [], "recon": []}
    fp_steps(2)
    recon_steps(2)
    for _ in range(args.repeats):
        times["fp"].append(fp_steps(args.steps))
        times["recon"].append(recon_steps(args.steps))
    trainer.close()
    scope.close()
    for key, values in times.items():
        print(f"{key:6s} best {1000 * min(values):8.2f} ms/step   "
              f"median {1000 * statistics.median(values):8.2f} ms/step")
    ratio = min(times["recon"]) / min(times["fp"])
    median = statistics.median(times["recon"]) / statistics.median(times["fp"])
    print(f"goal <= {GOAL}; median ratio {median:.2f}; machine shared with other sessions "
          f"(load average {open('/proc/loadavg').read().split()[0]})")
    print(f"ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
