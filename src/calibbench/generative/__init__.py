"""The generator stage: everything of generator-based data-free quantization in one place.

- ``network.py``: the conditional generator (GDFQ-style, cifar / imagenet variants);
- ``terms.py``: its loss terms (``GEN_TERMS``, ``@gen_term``; ``ce``, ``bns``) and the helpers
  every BN-statistics term shares (``spread``, ``moment_mse``, ``noisy_targets``);
- ``strategy.py``: :class:`GeneratorStrategy`, the calibration side (warm-up, sampling, hooks);
- ``handover.py``: :class:`GeneratorHandover`, what the calibration stage hands to refinement;
- ``alternating.py``: the Lightning module that trains generator and quantized model in turn
  (imported only when training: it imports Lightning);
- ``refiners.py``: :class:`GeneratorRefiner` (``requires = "generator"``) and ``refine=gdfq``;
- ``gdfq.py``, ``fdda.py``, ``clusterq.py``: the methods (strategy, terms, refiner each).

A stage package beside ``strategies/`` and ``refine/``: it builds on both (its strategies are
``Strategy`` subclasses in the strategy registry, its refiners ``Refiner`` subclasses in the
refine registry), and neither imports it. Importing this package registers its strategies,
refiners and terms; the entry points (``store.register_configs``, ``preflight``, ``pipeline``)
do so.
"""

from calibbench.generative import clusterq, fdda, gdfq, refiners, terms  # noqa: F401  (registers)
from calibbench.generative.handover import GeneratorHandover
from calibbench.generative.network import Generator, build_generator
from calibbench.generative.strategy import GeneratorStrategy, GeneratorStrategyConfig
from calibbench.generative.terms import GEN_TERMS, GenLossTerm, GenStepOutputs, gen_term

__all__ = ["Generator", "build_generator", "GeneratorStrategy", "GeneratorStrategyConfig", "GeneratorHandover",
           "GEN_TERMS", "GenLossTerm", "GenStepOutputs", "gen_term"]
