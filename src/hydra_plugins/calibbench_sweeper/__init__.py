"""Hydra plugin: ``hydra/sweeper=grid_union``, a union of grids in one multirun.

Hydra's basic sweeper runs one Cartesian product. ``sweep=variance`` needs two grids in one
command — 50 seeds of ``random`` but only seeds 0–4 of every other strategy — which a single
product cannot express without running (and paying for) 50 seeds of every strategy. Hydra finds
sweepers only under the ``hydra_plugins`` namespace package, hence this folder beside
``calibbench``.
"""
