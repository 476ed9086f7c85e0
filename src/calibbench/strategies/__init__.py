"""Calibration-data strategies. Importing this package registers every strategy.

A new strategy is one module here (decorated with ``@register``) plus ``conf/strategy/<name>.yaml``:
every module in this package is imported below, so no central list needs editing. The generator
strategies (gdfq, fdda, clusterq) live with the rest of the generator stage in
``calibbench.generative``, which registers them here when it is imported (the entry points do).
"""

import importlib
import pkgutil

from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext, available, build, get, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CalibrationSet", "Strategy", "StrategyContext", "available", "build", "get", "register"]
