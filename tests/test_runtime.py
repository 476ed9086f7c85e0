"""calibbench.runtime: the process-wide settings a run makes once, and the kernel family it records."""

from __future__ import annotations

import platform

import pytest
import torch

from calibbench import runtime


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_retain_freed_memory_is_set_once_on_glibc(monkeypatch):
    monkeypatch.setattr(runtime, "_RETAINED", None)
    assert runtime.retain_freed_memory() is True
    calls = []
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *a: calls.append(a))  # must not be reached again
    assert runtime.retain_freed_memory() is True and calls == []


def test_configure_touches_the_allocator_only_for_the_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda: seen.append(1) or True)
    runtime.configure(torch.device("meta"))
    assert seen == []
    runtime.configure(torch.device("cpu"))
    assert seen == [1]


def test_cpu_capability_is_torchs_dispatch_choice():
    assert runtime.cpu_capability() == torch.backends.cpu.get_cpu_capability() != ""
