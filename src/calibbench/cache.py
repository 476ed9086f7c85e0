"""Content-addressed cache for FP metrics and calibration sets.

An entry's name is the hash of everything that determines it, so a sweep over bits (which does
not change the calibration set) computes the set once. Each file starts with the sha256 of its
body: a torn or corrupted write is detected on read, logged, deleted and recomputed. Writes go to a
temporary file in the same folder and are renamed into place, so readers never see half a file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

log = logging.getLogger(__name__)
_DIGEST_LEN = 64


def content_key(payload: Any) -> str:
    """Stable hash of a JSON-able payload (dict key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _calibbench_imports(name: str, source: str) -> set[str]:
    """calibbench modules imported by module ``name`` (absolute and relative, any nesting)."""
    package = name if name.endswith(".__init__") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "calibbench")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "calibbench":
                continue
            for alias in node.names:  # `from calibbench import datasets` names a submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if _is_submodule(base, alias.name) else base)
    return found


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module file, found without importing it: asking
    ``find_spec`` for ``module.attribute`` would execute ``module`` (for ``generative.alternating``
    that imports Lightning, ~3 s a process, only to learn that ``warm_up`` is a function)."""
    try:
        spec = importlib.util.find_spec(package)  # imports package's parents, never package itself
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:  # a plain module: names are attributes
        return False
    return any((Path(loc) / f"{name}.py").is_file() or (Path(loc) / name / "__init__.py").is_file()
               for loc in spec.submodule_search_locations)


@lru_cache(maxsize=None)
def _module_source(name: str) -> tuple[str, str]:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ImportError(f"no Python source for module {name!r}")
    return spec.origin, Path(spec.origin).read_text()


def source_digest(modules: Iterable[str]) -> str:
    """Hash of the source of ``modules`` and of every calibbench module they import, transitively.

    Put into a cache key, it makes an algorithm change invalidate old entries by construction,
    with no version number to remember to bump. Package ``__init__`` files are only followed
    when something is imported from the package itself, not from one of its submodules.
    """
    seen: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        _, text = _module_source(name)
        seen[name] = hashlib.sha256(text.encode()).hexdigest()
        todo.extend(_calibbench_imports(name, text) - seen.keys())
    return content_key(sorted(seen.items()))


def atomic_write_bytes(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Cache:
    """``get_or_compute(kind, payload, compute)``: one file per entry under ``root/kind/``."""

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def load(self, kind: str, key: str) -> Optional[Any]:
        path = self.path(kind, key)
        if not self.enabled or not path.is_file():
            return None
        raw = path.read_bytes()
        digest, body = raw[:_DIGEST_LEN].decode(errors="replace"), raw[_DIGEST_LEN:]
        if hashlib.sha256(body).hexdigest() != digest:
            log.warning("cache entry %s is corrupt (checksum mismatch): recomputing", path)
            path.unlink(missing_ok=True)
            return None
        try:
            return torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)
        except Exception as err:  # a valid checksum over an unreadable body: written by other code
            log.warning("cache entry %s is unreadable (%s): recomputing", path, err)
            path.unlink(missing_ok=True)
            return None

    def save(self, kind: str, key: str, value: Any) -> None:
        if not self.enabled:
            return
        buf = io.BytesIO()
        torch.save(value, buf)
        body = buf.getvalue()
        atomic_write_bytes(self.path(kind, key), hashlib.sha256(body).hexdigest().encode() + body)

    def get_or_compute(self, kind: str, payload: Any, compute: Callable[[], Any]) -> tuple[Any, bool, str]:
        """Return ``(value, hit, key)``."""
        key = content_key(payload)
        value = self.load(kind, key)
        if value is not None:
            log.info("cache hit: %s/%s", kind, key)
            return value, True, key
        value = compute()
        self.save(kind, key, value)
        return value, False, key
