"""Own fake-quantization: uniform quantizer, range observers, quant layers, presets.

Public API: ``quantize(model, cfg, w_bits, a_bits)`` -> fake-quant copy; ``calibrate(qmodel,
batches, device)`` -> activation ranges, frozen; ``describe(qmodel)`` -> JSON summary.
"""

from calibbench.quant.modules import QuantAct, QuantConv2d, QuantLinear
from calibbench.quant.observers import (
                                        ACT_OBSERVERS,
                                        WEIGHT_OBSERVERS,
                                        ACIQObserver,
                                        EMAMinMaxObserver,
                                        MinMaxObserver,
                                        MSEObserver,
                                        Observer,
                                        PercentileObserver,
                                        build_observer,
)
from calibbench.quant.quantize import (
                                        PRESETS,
                                        calibrate,
                                        calibration_mode,
                                        describe,
                                        enable_calibration,
                                        fold_bn,
                                        freeze,
                                        mse_init,
                                        quantize,
                                        quantizers,
)
from calibbench.quant.quantizer import UniformQuantizer, qrange, range_to_qparams

__all__ = [
    "ACT_OBSERVERS", "WEIGHT_OBSERVERS", "PRESETS",
    "UniformQuantizer", "qrange", "range_to_qparams",
    "Observer", "MinMaxObserver", "EMAMinMaxObserver", "PercentileObserver", "MSEObserver",
    "ACIQObserver", "build_observer",
    "QuantConv2d", "QuantLinear", "QuantAct",
    "quantize", "calibrate", "calibration_mode", "enable_calibration", "freeze", "fold_bn",
    "quantizers", "describe", "mse_init",
]
