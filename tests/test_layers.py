"""Imports run one way (issue 24): the package's modules, grouped into units (``calibbench.X``
with its submodules), may import only units on a lower layer or on their own. Every import
statement counts, also those inside functions: a deferred import hides a circle, it does not
remove it.

Layers, bottom to top (DESIGN.md "Layers"; docs/architecture.md):

    config, registry                        schemas, validation, errors, the name registry
    quant, datasets, models, bnstats,       building blocks and leaf services
    evaluate, cache, seeding, tracking,
    figures, record, modes, runtime
    strategies, refine, generative          the stages (generative: the generator stage, which
                                            builds on strategies and refine; neither imports it)
    diagnostics, deploy, preflight          what runs around the stages
    pipeline                                one run
    report, store, cli, __main__, (root)    entry points (store: Hydra's ConfigStore registration)

``KNOWN_CIRCLES`` lists the import circles that remain, each with its reason; the test fails when
a new one appears *and* when a listed one is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "calibbench"

LAYERS: list[set[str]] = [
    {"config", "registry"},
    {"quant", "datasets", "models", "bnstats", "evaluate", "cache", "seeding", "tracking", "figures", "record",
     "modes", "runtime"},
    {"strategies", "refine", "generative"},
    {"diagnostics", "deploy", "preflight"},
    {"pipeline"},
    {"report", "store", "cli", "__main__", ""},
]

# None left: the generator stage (network, terms, strategy base, alternating module, its methods and
# refiners) has one home, calibbench.generative, which imports strategies and refine; strategies
# never imports refine or generative, and refine names strategies' types in annotations only.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, set[str]]:
    """unit → units it imports (module-level and function-level imports alike)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif (isinstance(node, ast.ImportFrom) and node.module == "calibbench"
                  and all(a.name.startswith("__") for a in node.names)):
                continue  # `from calibbench import __version__`: a constant of the package root, which
                # imports nothing at import time (its `run` reaches the pipeline only when called)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from calibbench import refine` imports calibbench.refine, not the package root
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs or [node.module]
            else:
                continue
            for target in targets:
                if target.startswith("calibbench") and unit_of(target) != unit_of(name):
                    edges[unit_of(name)].add(unit_of(target))
    return edges


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"calibbench.{unit} is on no layer: add it to LAYERS (and docs/architecture.md)")


def test_every_unit_is_on_a_layer():
    units = {"" if p == SRC / "__init__.py" else p.relative_to(SRC).with_suffix("").parts[0]
             for p in SRC.rglob("*.py")}
    for unit in units - {"conf"}:
        layer_of(unit)


def test_imports_only_go_down_except_the_known_circles():
    edges = import_graph()
    upward = sorted(f"calibbench.{a} (layer {layer_of(a)}) imports calibbench.{b} (layer {layer_of(b)})"
                    for a, targets in edges.items() for b in targets
                    if layer_of(b) > layer_of(a) and frozenset({a, b}) not in KNOWN_CIRCLES)
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
    circles = {frozenset({a, b}) for a, targets in edges.items() for b in targets if a in edges.get(b, ())}
    assert circles == KNOWN_CIRCLES, f"circles now: {sorted(map(sorted, circles))}"


def test_the_generator_stage_builds_on_strategies_and_refine_and_neither_imports_it():
    """generative/ subclasses Strategy and Refiner (and registers there); strategies/ and refine/
    never import it, and strategies/ never imports refine/ (a refiner's needs are declared)."""
    edges = import_graph()
    assert {"strategies", "refine"} <= edges["generative"]
    assert "generative" not in edges["strategies"] | edges["refine"]
    assert "refine" not in edges["strategies"]


def test_a_refiner_never_imports_a_strategy_module_at_run_time():
    """refine/ names Strategy, StrategyContext and CalibrationSet in annotations only (under
    ``TYPE_CHECKING``): what a refiner needs of the calibration stage is declared
    (``Refiner.requires``, ``check_strategy``) and compared by preflight, not imported."""
    found = []
    for path in sorted((SRC / "refine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                       for n in ast.walk(node)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom)
                     and node.module else [])
            if id(node) not in typing_only and any(n.startswith("calibbench.strategies") for n in names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"refine/ imports strategies/ at run time: {found}"


def test_config_imports_nothing_of_the_package():
    assert not import_graph().get("config"), "config.py is the bottom layer: it imports no calibbench unit"


def module_graph() -> dict[str, set[str]]:
    """module → modules it imports; a submodule taking names from its own package's ``__init__``
    is not counted (that is how a package exposes its parts)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs or [node.module]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return edges


def test_no_module_level_circle():
    edges = module_graph()
    circles = []
    for start in edges:  # a path from a module's imports back to it
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m == start:
                circles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
    assert not circles, f"modules on an import circle: {sorted(circles)}"
