"""Cost of one alternating step of a generator strategy relative to its two bare halves.

    python benchmarks/generator_cost.py                      # gdfq, resnet20, batch 64, W4A4
    python benchmarks/generator_cost.py --strategy fdda      # any registered generator strategy

Numerator: one step of the real refinement stage (``refine=<strategy's>``, Lightning, manual
optimization): a generator step (G forward, FP forward with the BN-statistics hooks, the
strategy's generator terms, backward into G, Adam) and a quantized-model step (student forward
through fake-quant + teacher, its terms, backward, SGD, scheduler), plus every hook, NaN check and
curve row. It is measured through ``calibbench.run`` at two step counts and differenced,
(t(N2) - t(N1)) / (N2 - N1), so the Trainer's setup, the warm-up and the evaluation cancel.

Denominator, on the same models and batch size: one bare generator step (G forward, FP forward,
CE, backward into G, Adam step) plus one bare refine step (teacher forward, student forward, KD,
backward, SGD step) — the arithmetic any alternating GDFQ-style step must do. The two sides are
interleaved (bare, pipeline N1, bare, pipeline N2, bare, ...) so background load hits both alike;
the median over ``--repeats`` rounds is the headline. Prints ``ratio <number>`` last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import compose, offline_env


def _pipeline_refine_seconds(overrides: list[str], steps: int, out: Path) -> float:
    """Seconds of the refinement stage of one real run with ``steps`` alternating steps."""
    from calibbench import pipeline

    cfg = compose(*overrides, f"budget.refine_steps={steps}", f"paths.output_dir={out}",
                  f"paths.cache_dir={out / 'cache'}", "resume=false")
    record = pipeline.run(cfg, out / f"run_{steps}_{time.perf_counter_ns()}")
    return float(record["refine"]["seconds"])


def _bare_seconds(gen: torch.nn.Module, fp: torch.nn.Module, student: torch.nn.Module, batch: int,
                  steps: int, temperature: float) -> float:
    """Seconds per bare generator step + bare refine step (optimizer steps included on both)."""
    g_opt = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    s_opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1e-4,
                            momentum=0.9, nesterov=True, weight_decay=1e-4)
    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        z = torch.randn(batch, gen.latent_dim, generator=rng)
        y = torch.randint(0, gen.num_classes, (batch,), generator=rng)
        g_opt.zero_grad(set_to_none=True)
        images = gen(z, y)
        F.cross_entropy(fp(images), y).backward()
        g_opt.step()
        x = images.detach()
        with torch.no_grad():
            t_logits = fp(x)
        s_opt.zero_grad(set_to_none=True)
        s_logits = student(x)
        kd = F.kl_div(F.log_softmax(s_logits / temperature, 1), F.log_softmax(t_logits / temperature, 1),
                      reduction="batchmean", log_target=True) * temperature ** 2
        kd.backward()
        s_opt.step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", default="gdfq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="generator batch (budget=cpu: 64)")
    parser.add_argument("--steps", type=int, nargs=2, default=(5, 25), metavar=("N1", "N2"),
                        help="alternating steps of the two pipeline runs that are differenced")
    parser.add_argument("--bare-steps", type=int, default=10, help="bare steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    offline_env()
    from calibbench import models, quant
    from calibbench.generative.network import build_generator

    overrides = [f"strategy={args.strategy}", f"bits={args.bits}", "budget=cpu",
                 f"budget.gen_batch_size={args.batch_size}", "budget.gen_warmup_steps=2",
                 "budget.eval_limit=256", f"threads={args.threads}", "num_samples=64"]
    cfg = compose(*overrides)
    fp = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir).module.eval()
    fp.requires_grad_(False)
    num_classes = int(cfg.dataset.num_classes)
    gen = build_generator(num_classes, num_classes, int(cfg.model.input_size), 3).train()
    student = quant.quantize(fp, cfg.quant, args.bits, args.bits).eval()
    with torch.no_grad():
        calib = gen(torch.randn(64, gen.latent_dim), torch.arange(64) % num_classes)
    quant.calibrate(student, [calib], "cpu")
    for p in student.parameters():
        p.requires_grad_(True)
    temperature = float(cfg.refine.temperature)
    print(f"strategy={args.strategy} refine={cfg.refine.name}, resnet20 W{args.bits}A{args.bits}, "
          f"batch {args.batch_size}, threads={args.threads}; pipeline runs of {args.steps[0]} and "
          f"{args.steps[1]} steps, {args.repeats} rounds")

    n1, n2 = args.steps
    alt, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _pipeline_refine_seconds(overrides, 2, out)  # warm-up: FP metrics into the cache, imports
        _bare_seconds(gen, fp, student, args.batch_size, 2, temperature)
        for _ in range(args.repeats):
            b1 = _bare_seconds(gen, fp, student, args.batch_size, args.bare_steps, temperature)
            t1 = _pipeline_refine_seconds(overrides, n1, out)
            b2 = _bare_seconds(gen, fp, student, args.batch_size, args.bare_steps, temperature)
            t2 = _pipeline_refine_seconds(overrides, n2, out)
            b3 = _bare_seconds(gen, fp, student, args.batch_size, args.bare_steps, temperature)
            alt.append((t2 - t1) / (n2 - n1))
            bare.append(statistics.fmean([b1, b2, b3]))
            print(f"  round: alternating step {1000 * alt[-1]:7.1f} ms   bare G step + refine step "
                  f"{1000 * bare[-1]:7.1f} ms   ratio {alt[-1] / bare[-1]:.3f}")
    ratios = [a / b for a, b in zip(alt, bare)]
    print(f"alternating step: median {1000 * statistics.median(alt):.1f} ms; bare halves: median "
          f"{1000 * statistics.median(bare):.1f} ms")
    print(f"ratio {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
