"""The run record's file names and its provenance (which code and packages ran).

Light on purpose (no torch at import): the report reads result files by these names, and a
sweep's summary must not pull in the models. ``versions()`` imports what it needs when called."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RESULT_FILE = "result.json"
DIAGNOSTICS_FILE = "diagnostics.json"
FIGURE_FILE = "diagnostics.png"
STATE_FILE = "quant_state.pt"
PACKAGES = ("torch", "torchvision", "pytorchcv", "hydra-core", "omegaconf", "lightning", "wandb", "numpy")
CURVE_POINTS = 200  # result.json keeps at most this many points of a curve (loss curve, centroid shifts)


def thin(n: int, max_points: int = CURVE_POINTS) -> list[int]:
    """Indices of at most ``max_points`` evenly spaced entries of a length-``n`` series, first and
    last included (how every curve in result.json is kept short)."""
    if n == 0:
        return []
    k = min(n, max_points)
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty.strip() else head


@functools.lru_cache(maxsize=8)
def _loaded_source_digest(modules: tuple[str, ...]) -> str:
    """Digest of the source of ``modules``; once per process and module set (code that is loaded
    does not change, and a sweep's jobs would otherwise re-read and re-parse it every run)."""
    from calibbench.cache import source_digest

    try:
        return source_digest(modules)
    except ImportError:  # a module without Python source (e.g. compiled): say so, do not fail the run
        return "unknown"


def versions() -> dict[str, str]:
    """Package versions plus which code ran: the git commit of the checkout (if any) and a digest
    of the source of every calibbench module loaded (every strategy and refiner is loaded by
    then), exact even for an installed wheel or a dirty tree."""
    from calibbench import __version__

    loaded = tuple(sorted(m for m in list(sys.modules) if m == "calibbench" or m.startswith("calibbench.")))
    found = {"python": platform.python_version(), "calibbench": __version__,
             "calibbench_git": git_commit(), "calibbench_source": _loaded_source_digest(loaded)}
    for pkg in PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    return found
