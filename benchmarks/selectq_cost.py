"""Cost of SelectQ selection relative to one plain FP forward pass over the same pool.

    python benchmarks/selectq_cost.py              # 10k-image pool of cifar10_jpeg train, resnet20
    python benchmarks/selectq_cost.py --pool 2000  # quicker

Both timings use the same loader (same indices, order, batch size, workers) on the same model,
so the ratio isolates what SelectQ adds: hooks, statistics, centroid updates (per image by default:
``strategy.update_batch_size=1``, one update step per pool image) and ranking (plus its K random
init images and loading the selected images). An untimed warm-up pass first puts
the JPEG files in the page cache so neither timed pass pays for cold disk reads; the FP pass is
timed before and after the selection and averaged to even out load from other jobs. Goal ≤ 1.2.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _common import compose, fp_pass, offline_env

offline_env()



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=10_000, help="pool size (train images)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="selection runs (median reported)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. strategy.stats=channel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from calibbench import datasets, models
    from calibbench.strategies import StrategyContext, build
    from calibbench.strategies.selectq import pool_and_order, resolve_pool_size

    cfg = compose("strategy=selectq", "budget=cpu", f"budget.pool_size={args.pool}",
                  f"num_samples={args.num_samples}", *args.overrides)
    data = datasets.build(cfg.dataset, cfg.model)
    model = models.build(cfg.model, cfg.dataset.name, cfg.paths.weights_dir).module
    ctx = StrategyContext(model=model, data=data, device=torch.device("cpu"), seed=int(cfg.seed),
                          num_samples=args.num_samples, budget=cfg.budget, progress=False)
    strategy = build(cfg.strategy)
    batch_size = strategy.forward_batch_size(ctx)
    pool, order = pool_and_order(ctx, resolve_pool_size(cfg.strategy, ctx), cfg.strategy.shuffle)

    def loader():  # noqa: ANN202 - the exact loader SelectQ builds
        return data.loader(data.train, batch_size, pool[order].tolist())

    fp_pass(model, loader())  # warm-up: page cache, allocator, worker start-up paths
    fp_times, sel_times = [fp_pass(model, loader())], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        calib = strategy.calibration_set(ctx)
        sel_times.append(time.perf_counter() - start)
        fp_times.append(fp_pass(model, loader()))
    fp, sel = statistics.mean(fp_times), statistics.median(sel_times)
    print(f"pool {len(pool)} images, batch {batch_size}, threads {args.threads}, "
          f"workers {data.num_workers}, stats={cfg.strategy.stats}, "
          f"update_batch_size={cfg.strategy.update_batch_size}")
    print(f"FP forward pass : {fp:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in fp_times)})")
    print(f"SelectQ select  : {sel:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in sel_times)}; "
          f"breakdown {calib.info['seconds']}; {calib.info['update_steps']} update steps)")
    print(f"ratio           : {sel / fp:8.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
