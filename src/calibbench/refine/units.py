"""Reconstruction units: which modules are reconstructed together (``refine.granularity``).

``layer`` (AdaRound): every conv/linear in execution order, with the BN and activation that follow
it (``conv → bn → relu``, confirmed by a forward pass; :func:`layer_units`): AdaRound's target is
the layer's output after its activation, f_a(W x), and with BN kept (``dfq_legacy``) the
per-channel errors are weighted by the BN's γ/σ as they are downstream. A layer whose output feeds
a residual add (a unit body's last conv) ends after its BN.

``block`` (BRECQ, QDrop): the units the BRECQ paper reconstructs jointly — the stem, each residual
unit with its shortcut, each inverted-residual block, the head — found by ONE structural rule
instead of a list per model:

1. **The chain.** Starting at the model, descend into every ``nn.Sequential`` (and into the model
   itself); every other module met on the way is a *chain element*. pytorchcv's ResNets and
   MobileNets give ``init_block, stage*.unit*, final_block, final_pool, output``; torchvision's
   ResNet-18 gives ``conv1, bn1, relu, maxpool, layer*.N, avgpool, fc``. A residual unit is never
   a Sequential (its forward adds the shortcut), so it stays one element with its shortcut inside.
2. **Check it.** One forward pass confirms that the elements run once each, in this order, each
   reading exactly what the one before it produced (a flatten in between is allowed, as
   torchvision's ``torch.flatten`` before ``fc``), the first reading the image and the last
   producing the logits. A model whose forward does anything else (a skip across elements, a
   reused module, a functional op with a value change between elements) fails the check.
3. **Group.** An element with a conv/linear inside starts a unit. An element without one (BN,
   activation, pooling) joins the unit of the *bare layer* it follows (``conv1 → bn1 → relu →
   maxpool`` is the stem), and otherwise the unit it feeds (``final_pool`` belongs to the head that
   reads it); weightless elements at the very end join the last unit.

A model that fails the check falls back to layers, with a warning. The same rule also yields the
per-element input shapes, so a unit can be run on its own (:meth:`Unit.run`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from calibbench.modes import eval_mode
from calibbench.quant.quantize import probe_forward

log = logging.getLogger(__name__)

GRANULARITIES = ("layer", "block")
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)  # QuantConv2d / QuantLinear subclass them


@dataclass
class Unit:
    """Modules reconstructed together: chain elements (paths) run one after the other."""

    name: str
    kind: str  # layer | stem | block | head
    paths: list[str]
    # Per element: the per-sample input shape it expects (a flatten before it), None = as produced.
    shapes: list[Optional[tuple[int, ...]]] = field(default_factory=list)

    def modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(p) for p in self.paths]

    def layers(self, model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
        """The conv/linear layers inside the unit (their weights are what reconstruction rounds)."""
        found: list[nn.Conv2d | nn.Linear] = []
        seen = set()
        for module in self.modules(model):
            for m in module.modules():
                if isinstance(m, WEIGHT_TYPES) and id(m) not in seen:
                    seen.add(id(m))
                    found.append(m)
        return found

    def run(self, modules: list[nn.Module], x: Tensor) -> Tensor:
        shapes = self.shapes or [None] * len(modules)
        for module, shape in zip(modules, shapes):
            if shape is not None and tuple(x.shape[1:]) != shape:
                x = x.reshape(x.shape[0], *shape)
            x = module(x)
        return x


def _has_weights(module: nn.Module) -> bool:
    return any(isinstance(m, WEIGHT_TYPES) for m in module.modules())


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Rule 1: descend into the model and every nn.Sequential; everything else is an element."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module, top: bool) -> None:
        if top or isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child, False)
        else:
            out.append((prefix, module))

    visit("", model, True)
    return out


class _NotAChain(Exception):
    pass


def _check_chain(model: nn.Module, elements: list[tuple[str, nn.Module]], example: Tensor
                 ) -> list[Optional[tuple[int, ...]]]:
    """Rule 2: the forward pass runs the elements as a chain; returns each element's input shape
    where it differs from what the element before produced (a flatten), else None."""
    calls: list[int] = []
    produced: list[Optional[Tensor]] = [None]
    shapes: list[Optional[tuple[int, ...]]] = [None] * len(elements)
    problems: list[str] = []
    handles = []

    def pre(i: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            calls.append(i)
            x = args[0] if args else None
            prev = produced[0]
            expected = example if i == 0 else prev
            if len(args) != 1 or not isinstance(x, Tensor) or expected is None:
                problems.append(f"{elements[i][0]}: not called with one tensor after its predecessor")
            elif x.shape != expected.shape:
                if x.numel() != expected.numel() or not torch.equal(x.reshape(-1), expected.reshape(-1)):
                    problems.append(f"{elements[i][0]}: input is not its predecessor's output")
                else:
                    shapes[i] = tuple(x.shape[1:])
            elif not torch.equal(x, expected):
                problems.append(f"{elements[i][0]}: input is not its predecessor's output")
        return hook

    def post(i: int) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            produced[0] = output.detach().clone() if isinstance(output, Tensor) else None
        return hook

    for i, (_, module) in enumerate(elements):
        handles.append(module.register_forward_pre_hook(pre(i)))
        handles.append(module.register_forward_hook(post(i)))
    try:
        with eval_mode(model), torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    if calls != list(range(len(elements))):
        raise _NotAChain(f"elements ran in the order {calls[:12]}..., not once each in order")
    if problems:
        raise _NotAChain("; ".join(problems[:3]))
    last = produced[0]
    if last is None or last.numel() != out.numel() or not torch.equal(last.reshape(-1), out.reshape(-1)):
        raise _NotAChain("the last element's output is not the model's output")
    return shapes


def execution_order(model: nn.Module, example: Tensor) -> list[str]:
    """Paths of the conv/linear layers in the order a forward pass calls them (first call)."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: order.append(names[id(mod)]))
               for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES)]
    probe_forward(model, example, handles)
    return list(dict.fromkeys(order))


def _is_follower(module: nn.Module, which: str) -> bool:
    """A BN (or the Identity a folded BN became) / an activation that may end a layer unit."""
    from calibbench.quant.modules import QuantAct
    from calibbench.quant.quantize import _is_activation

    if which == "bn":
        return isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.Identity))
    return isinstance(module, QuantAct) or _is_activation(module, "all")


def _candidate_followers(model: nn.Module, path: str) -> list[str]:
    """The siblings registered right after the layer ``path``: a BN (or folded Identity) and/or an
    activation, in that order (pytorchcv's ConvBlock ``conv, bn, activ``; torchvision's
    ``conv1, bn1, relu``). The forward pass confirms them (:func:`_confirm_followers`)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    children = list(parent.named_children())
    names = [n for n, _ in children]
    if name not in names:
        return []
    out, k = [], names.index(name) + 1
    for which in ("bn", "act"):
        if k < len(children) and _is_follower(children[k][1], which):
            out.append(f"{parent_path}.{children[k][0]}" if parent_path else children[k][0])
            k += 1
    return out


def _confirm_followers(model: nn.Module, chains: dict[str, list[str]], example: Tensor
                       ) -> dict[str, list[str]]:
    """Keep, for every layer, the longest prefix of its candidate followers that one forward pass
    runs as a chain: each follower called exactly once, on exactly what the element before it
    returned (a ReLU module reused after a residual add, as torchvision's, is dropped)."""
    calls: dict[str, list[Optional[Tensor]]] = {}
    outs: dict[str, list[Tensor]] = {}
    handles = []
    paths = {p for path, chain in chains.items() for p in [path, *chain]}
    for p in paths:
        m = model.get_submodule(p)
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, p=p: calls.setdefault(p, []).append(args[0] if args else None)))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, p=p: outs.setdefault(p, []).append(out)))
    probe_forward(model, example, handles)
    confirmed = {}
    for path, chain in chains.items():
        keep, prev = [], path
        for p in chain:
            ins, prev_out = calls.get(p, []), outs.get(prev, [])
            if len(ins) != 1 or len(prev_out) != 1 or ins[0] is None or \
                    ins[0].shape != prev_out[0].shape or not torch.equal(ins[0], prev_out[0]):
                break
            keep.append(p)
            prev = p
        confirmed[path] = keep
    return confirmed


def layer_units(model: nn.Module, example: Tensor, through: bool = True) -> list[Unit]:
    """One unit per conv/linear, in execution order (a layer never run is left out). With
    ``through`` (AdaRound's target f_a(W x)), a layer's unit also holds the BN (or the Identity
    of a folded BN) and the activation that directly follow it, when the forward pass runs them
    on the layer's output and nothing else; its target is taken after them."""
    order = execution_order(model, example)
    chains = {p: _candidate_followers(model, p) for p in order} if through else {}
    if chains:
        chains = _confirm_followers(model, chains, example)
    return [Unit(name=path, kind="layer", paths=[path, *chains.get(path, [])],
                 shapes=[None] * (1 + len(chains.get(path, []))))
            for path in order]


def block_units(model: nn.Module, example: Tensor) -> Optional[list[Unit]]:
    """The block units of ``model`` by the rule in the module docstring; None when the model's
    forward is not a chain of the elements (the caller falls back to layers)."""
    elements = _chain(model)
    try:
        shapes = _check_chain(model, elements, example)
    except _NotAChain as err:
        log.warning("refine: %s is not a chain of blocks (%s)", type(model).__name__, err)
        return None
    groups: list[list[int]] = []
    pending: list[int] = []  # weightless elements waiting for the unit they feed
    after_bare = False  # the last element placed belongs to a unit started by a bare conv/linear
    for i, (_, module) in enumerate(elements):
        if _has_weights(module):
            groups.append([*pending, i])
            pending = []
            after_bare = isinstance(module, WEIGHT_TYPES)
        elif after_bare:
            groups[-1].append(i)  # BN / activation / pooling of a bare layer: conv → bn → relu
        else:
            pending.append(i)  # e.g. the pooling that feeds the head
    if not groups:
        return None
    if pending:
        groups[-1].extend(pending)
    units = []
    for k, group in enumerate(groups):
        weighted = [elements[j][0] for j in group if _has_weights(elements[j][1])]
        kind = "stem" if k == 0 else "head" if k == len(groups) - 1 else "block"
        units.append(Unit(name=weighted[0], kind=kind, paths=[elements[j][0] for j in group],
                          shapes=[shapes[j] for j in group]))
    return units


def build_units(model: nn.Module, granularity: str, example: Tensor, through: bool = True
                ) -> tuple[list[Unit], str]:
    """``(units, granularity actually used)``; ``block`` falls back to ``layer`` with a warning;
    ``through``: layer units end after their BN and activation (:func:`layer_units`)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; valid choices: {', '.join(GRANULARITIES)}")
    if granularity == "block":
        units = block_units(model, example)
        if units is not None:
            return units, "block"
        log.warning("refine: %s cannot be split into blocks by the structural rule; "
                    "reconstructing layer by layer instead", type(model).__name__)
    return layer_units(model, example, through), "layer"
