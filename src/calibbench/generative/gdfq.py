"""``gdfq``: Generative low-bitwidth Data-Free Quantization (Xu et al., ECCV 2020), the baseline of
the generator-based strategies.

A conditional generator G(z, y) (``generative/network.py``) learns from the FP model alone:
``CE(F(G(z, y)), y) + 0.1 · L_BNS``, where L_BNS matches the mean and variance of each BN layer's
input over the generated batch to the layer's running statistics (averaged over layers; the
weight 0.1 and the variance are the GDFQ code's — ``bns_moment=std`` compares stds, the paper's σ).
The quantized model is trained on the generated batches with KD (T = 20) + CE to the generator's
labels (``refine=gdfq``), one generator step before each quantized-model step, after a warm-up
of the generator alone (``budget.gen_warmup_steps``; GDFQ: 4 epochs × 200 iterations).

Calibration of the activation ranges (a decision, docs/generators.md): the GDFQ code lets the
quantized model's activation ranges follow the generated batches during the warm-up epochs and
freezes them afterwards; calibbench warms the generator up first and then samples ``num_samples``
class-balanced images from it, which the shared calibration path (the run's range estimator)
turns into ranges, as for every other strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibbench.generative.strategy import GeneratorStrategy, GeneratorStrategyConfig
from calibbench.strategies.base import register


@dataclass
class GDFQConfig(GeneratorStrategyConfig):
    name: str = "gdfq"


@register("gdfq", GDFQConfig)
class GDFQ(GeneratorStrategy):
    """The plain GDFQ generator: terms ``ce`` and ``bns`` (``generative/terms.py``)."""
