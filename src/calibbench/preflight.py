"""One preflight: everything that can be checked from the config alone, before any work.

:func:`preflight` is the single place the pipeline validates a run: the config's ranges and
choices (``config.validate``), every option of the chosen strategy (its class-level
:meth:`~calibbench.strategies.base.Strategy.check` hook, which also covers the budget fields the
strategy reads), every option of the chosen refiner (``refine.validate``, which calls the
refiner's class-level ``check``), the strategy × refiner combination (the strategy's
``check_run``, the refiner's ``check_strategy``: what it ``requires``), and that
the output and cache folders can be written. Nothing here builds the model or reads data, so a
bad option costs no model, no data and no FP evaluation. Checks that need the model or the data
(the pool size, the number of classes, feature-module names) stay with the stage that has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from calibbench import generative, refine, strategies
from calibbench.config import check_writable, validate

_ = generative  # imported for its registrations: the generator stage's strategies and refiners


def preflight(cfg: Any, run_dir: Optional[str | Path] = None) -> strategies.Strategy:
    """Validate the whole run config ``cfg``; return the (one) strategy built from it.

    Raises :class:`~calibbench.config.ConfigError` naming the key and the valid values."""
    validate(cfg)
    strategy_cls = strategies.get(cfg.strategy.name)  # an unknown name lists the registered ones
    strategy_cls.check(cfg)
    refine.validate(cfg)  # an unknown refiner, a bad refine option (the refiner's own check)
    strategy = strategy_cls(cfg.strategy)
    strategy.check_run(cfg)  # strategy x refine combinations (e.g. gdfq needs its training)
    refine.get(cfg.refine.name).check_strategy(cfg, strategy)  # ... and what the refiner requires
    if run_dir is not None:
        check_writable(run_dir, "the run folder")
    check_writable(cfg.paths.cache_dir, "the cache folder (paths.cache_dir)")
    return strategy
