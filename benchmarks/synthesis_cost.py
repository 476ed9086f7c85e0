"""Cost of one ZeroQ / DSG synthesis iteration relative to a plain forward+backward.

The synthesis loop adds BN-input statistics, the loss, Adam and the LR scheduler to what any
pixel optimization must do anyway (a forward pass and a backward pass to the pixels). This script
times both on the same batch (32 images, 32×32, the offline pretrained resnet20) in one process,
with warm-up and interleaved repeats, and prints the ratio; the goal is ≤ 1.15 (issue 24). The headline ratio
is the median over repeats of (synthesis run) / (mean of the baseline runs just before and after).

    python benchmarks/synthesis_cost.py [--threads 1] [--iterations 15] [--repeats 9] [--breakdown]
                                        [--allocator pipeline|default]

Both sides run with the process settings a run has (``runtime.configure``, as ``pipeline.run``
calls it: on glibc, freed memory stays in the process); ``--allocator default`` keeps glibc's
defaults instead, under which every fresh activation-sized tensor is page-faulted in again: the
plain pass and the synthesis step both slow down, the step more (it allocates more such tensors),
and the timings get noisier.

``--breakdown`` also splits a ZeroQ step into what each part adds over the plain pass, interleaved
in the same rounds: the hooks' forward statistics alone (detached, no backward through them), the
loss with its backward through the statistics (no optimizer), and the whole step with Adam.

The baseline backpropagates to the pixels with frozen parameters (what the synthesis itself does);
the same pass with parameter gradients is printed for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "resnet20_cifar10_jpeg.pth"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def load_model(weights: Path) -> torch.nn.Module:
    from pytorchcv.model_provider import get_model

    model = get_model("resnet20_cifar10", pretrained=False)
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        print(f"note: {weights} not found, timing a random-init resnet20 (same cost)")
    return model.eval()


def time_plain(model: torch.nn.Module, x: torch.Tensor, steps: int, param_grads: bool) -> float:
    """Seconds per forward+backward of ``x`` (input gradient; parameter gradients if asked)."""
    for p in model.parameters():
        p.requires_grad_(param_grads)
    x = x.clone().requires_grad_(True)
    for _ in range(3):  # warm-up
        model(x).logsumexp(1).sum().backward()
    start = time.perf_counter()
    for _ in range(steps):
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()
    elapsed = (time.perf_counter() - start) / steps
    for p in model.parameters():
        p.requires_grad_(True)
    return elapsed


def time_strategy(name: str, model: torch.nn.Module, iterations: int, batch: int) -> float:
    """Seconds per synthesis iteration, as the strategy measures its own optimization loop."""
    from calibbench.config import BudgetConfig
    from calibbench.datasets import DataModule
    from calibbench.strategies import StrategyContext, build
    from calibbench.strategies.dsg import DSGConfig
    from calibbench.strategies.zeroq import ZeroQConfig

    data = DataModule("bench", [], [], 10, 32, MEAN, STD, num_workers=0)  # type: ignore[arg-type]
    budget = BudgetConfig(name="bench", synth_iterations=iterations, synth_batch_size=batch)
    # DSG at the same batch as the baseline (its default is L images, 21 for resnet20).
    cfg = ZeroQConfig() if name == "zeroq" else DSGConfig(margin_samples=batch, batch_size=batch)
    ctx = StrategyContext(model, data, torch.device("cpu"), 0, batch, budget, progress=False)
    return float(build(cfg).calibration_set(ctx).info["seconds_per_iteration"])


def time_breakdown(model: torch.nn.Module, x: torch.Tensor, steps: int) -> dict[str, float]:
    """Seconds per step of the plain pass and of a ZeroQ step built up part by part (see above)."""
    from calibbench.bnstats import BNStatsRecorder
    from calibbench.strategies.zeroq import ZeroQObjective

    for p in model.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.5)
    detached, live = BNStatsRecorder(model, detach=True), BNStatsRecorder(model)
    objective = ZeroQObjective(live, live.targets())

    def plain() -> None:
        x.grad = None
        model(x).logsumexp(1).sum().backward()

    def stats_forward() -> None:
        detached.clear()
        plain()

    def step(adam: bool) -> None:
        """The synthesis loop's step (strategies/synthesis.py), with or without its optimizer."""
        opt.zero_grad(set_to_none=True)
        live.clear()
        terms = objective(x, model(x), None)
        torch.stack([t.detach() for t in terms.values()]).tolist()
        terms["total"].backward()
        if adam:
            opt.step()

    out = {}
    for key, fn, recorder in (("plain", plain, None), ("+ forward statistics", stats_forward, detached),
                              ("+ loss and its backward", lambda: step(False), live),
                              ("+ Adam (whole step)", lambda: step(True), live)):
        if recorder is not None:
            recorder.install()
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        out[key] = (time.perf_counter() - start) / steps
        if recorder is not None:
            recorder.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=15, help="synthesis steps per timed run")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--breakdown", action="store_true", help="also split a ZeroQ step into its parts")
    parser.add_argument("--allocator", choices=("pipeline", "default"), default="pipeline",
                        help="pipeline: runtime.configure as a run does | default: glibc's settings")
    args = parser.parse_args()
    if args.allocator == "pipeline":
        from calibbench import runtime

        runtime.configure(torch.device("cpu"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.weights)
    x = torch.randn(args.batch, 3, 32, 32)
    time_strategy("zeroq", model, 5, args.batch)  # warm-up of the whole path
    time_strategy("dsg", model, 5, args.batch)
    runs: dict[str, list[float]] = {"plain": [], "plain_params": [], "zeroq": [], "dsg": []}
    paired: dict[str, list[float]] = {"zeroq": [], "dsg": []}
    parts: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        # Short runs, interleaved, each synthesis run between two baseline runs: other jobs on the
        # machine change the speed by tens of percent within seconds, so only neighbours compare.
        before = time_plain(model, x, args.iterations, param_grads=False)
        for key in ("zeroq", "dsg"):
            t = time_strategy(key, model, args.iterations, args.batch)
            after = time_plain(model, x, args.iterations, param_grads=False)
            runs[key].append(t)
            runs["plain"] += [before, after]
            paired[key].append(t / ((before + after) / 2))
            before = after
        runs["plain_params"].append(time_plain(model, x, args.iterations, param_grads=True))
        if args.breakdown:
            for key, value in time_breakdown(model, x, args.iterations).items():
                parts.setdefault(key, []).append(value)
    best = {k: min(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"resnet20, batch {args.batch}x3x32x32, {args.threads} thread(s), {args.iterations} steps x "
          f"{args.repeats} repeats, allocator: {args.allocator} (min / median, ms)")
    for key, label in (("plain", "plain forward+backward (pixel grad)"),
                       ("plain_params", "plain forward+backward (+param grads)"),
                       ("zeroq", "zeroq iteration"), ("dsg", "dsg iteration")):
        print(f"  {label:40s} {best[key] * 1e3:8.2f}  {med[key] * 1e3:8.2f}")
    for key in ("zeroq", "dsg"):
        print(f"ratio {key} / plain: {statistics.median(paired[key]):.3f} (median of paired runs)  "
              f"{best[key] / best['plain']:.3f} (min / min)   goal <= 1.15")
    if parts:
        base = statistics.median(parts["plain"])
        print("zeroq step built up part by part (median ms, ratio to plain; same rounds):")
        for key, values in parts.items():
            print(f"  {key:40s} {statistics.median(values) * 1e3:8.2f}  {statistics.median(values) / base:.3f}")


if __name__ == "__main__":
    main()
