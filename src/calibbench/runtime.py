"""Process-wide runtime settings and facts: the allocator, and which CPU kernels torch picked.

One home for what a run sets once for the whole process (the pipeline calls :func:`configure`
after choosing the device) and for the kernel family the numbers were computed with (recorded in
the result's provenance: on the CPU, the same seed gives the same numbers on the same ISA; AVX2
and AVX-512 kernels differ in the last bits, visibly after training).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

_RETAINED: Optional[bool] = None


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only; once per process; False elsewhere).

    A block's reconstruction step allocates ~30 MB more than its float step (quantizer
    intermediates, masks, the batch), and glibc's default trim/mmap thresholds hand that back to
    the kernel at the end of every step and fault it in again at the next: ~3,000 page faults per
    resnet20 step, a third of the step's overhead over the float step (benchmarks/recon_cost.py).
    Allocations up to 32 MB then come from the heap and up to 1 GiB of free heap is kept; the peak
    is unchanged. The numbers do not depend on the allocator.
    """
    global _RETAINED
    if _RETAINED is None:
        _RETAINED = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        # M_MMAP_THRESHOLD (-3; 32 MB is glibc's largest) and M_TRIM_THRESHOLD (-1)
        _RETAINED = bool(mallopt(-3, 32 * 2**20)) and bool(mallopt(-1, 2**30))
        log.debug("freed memory kept in the process (mallopt): %s", _RETAINED)
    return _RETAINED


def configure(device: torch.device) -> None:
    """What a run sets once per process for its device (CPU: keep freed memory, see above)."""
    if device.type == "cpu":
        retain_freed_memory()


def cpu_capability() -> str:
    """The CPU kernel family torch dispatches to ("AVX2", "AVX512", "DEFAULT", ...): part of
    which numbers a CPU run gives (``ATEN_CPU_CAPABILITY`` overrides it)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # older torch
        return "unknown"
