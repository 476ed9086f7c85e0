"""Calibration-data strategies. Importing this package registers every strategy.

A new strategy is one module here (decorated with ``@register``) plus ``conf/strategy/<name>.yaml``:
every module in this package is imported below, so no central list needs editing.
"""

import importlib
import pkgutil

from calibbench.strategies.base import CalibrationSet, Strategy, StrategyContext, available, build, get, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CalibrationSet", "Strategy", "StrategyContext", "available", "build", "get", "register"]
