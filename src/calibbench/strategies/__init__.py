"""Calibration-data strategies. Importing this package registers every strategy."""

from calibbench.strategies.base import (CalibrationSet, Strategy, StrategyContext, available,
                                        build, register)

# Each module registers itself with @register; import order does not matter.
from calibbench.strategies import random as _random  # noqa: F401,E402

__all__ = ["CalibrationSet", "Strategy", "StrategyContext", "available", "build", "register"]
