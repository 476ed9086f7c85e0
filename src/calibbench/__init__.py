"""calibbench: calibration-data strategies for PTQ/DFQ, compared on one shared pipeline."""

__version__ = "0.1.0"


def run(cfg):  # noqa: ANN001, ANN201 - thin re-export so `calibbench.run(cfg)` works
    """Run one experiment from a composed config and return its result record (a dict)."""
    from calibbench.pipeline import run as _run

    return _run(cfg)
