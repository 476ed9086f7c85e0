"""Quantizer coverage on MobileNetV3 (pytorchcv ``mobilenetv3_large_w1``), counted from
``quant.describe``: which modules get weight and activation quantizers under each preset, and BN
folding in ``academic`` preserving the FP outputs.

``python tests/test_mobilenetv3_quant.py`` prints the table of docs/quantizer.md.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS = ("first conv (image)", "hard-swish outputs", "ReLU outputs (outside SE)", "SE convs",
        "SE ReLU outputs", "SE gates (h-sigmoid)", "SE-scaled features (x * gate)", "classifier convs",
        "all Conv2d")


def mobilenetv3() -> nn.Module:
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    return get_model("mobilenetv3_large_w1", pretrained=False).eval()


def producers(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """(kind of every activation/SE module by path, kind of the tensor each Conv2d reads by path),
    from one forward pass that follows tensor identity: a conv reads a hard-swish output when its
    input *is* that module's output."""
    kinds: dict[str, str] = {}
    for path, m in model.named_modules():
        name = type(m).__name__
        in_se = ".se." in f"{path}." and not path.endswith(".se")
        if name == "HSwish":
            kinds[path] = "hswish"
        elif isinstance(m, nn.ReLU):
            kinds[path] = "se_relu" if in_se else "relu"
        elif name == "HSigmoid":
            kinds[path] = "gate"
        elif name == "SEBlock":
            kinds[path] = "se_scaled"
    made: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept alive: ids are not reused
    read: dict[str, str] = {}
    hooks = []
    for path, m in model.named_modules():
        if path in kinds:
            hooks.append(m.register_forward_hook(lambda mod, i, o, k=kinds[path]: made.__setitem__(id(o), (k, o))))
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, i, p=path: read.__setitem__(p, made.get(id(i[0]), ("other",))[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return kinds, read


def coverage(preset: str) -> dict[str, tuple[int, int, int]]:
    """Row → (modules in the model, weight quantizers, activation quantizers) for ``preset`` at
    W6A6. Activation quantizers count output quantizers (``after_relu``) and input quantizers of
    the convs that read that tensor (``layer_input``)."""
    from calibbench import quant
    from calibbench.config import QuantConfig

    model = mobilenetv3()
    kinds, read = producers(model)
    fields = dict(name=preset)
    if preset == "academic":
        fields.update(act_placement="layer_input", fold_bn=True, first_last_bits=8, quantize_input=True)
    rows = quant.describe(quant.quantize(model, QuantConfig(**fields), 6, 6))["quantizers"]
    weights = {p.rsplit(".", 1)[0] for p, kind, _ in rows if kind == "weight"}
    outputs = {p.rsplit(".", 1)[0] for p, kind, _ in rows if kind == "activation"}
    inputs = {p.rsplit(".", 1)[0] for p, kind, _ in rows if kind == "input"}
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    by_kind = collections.defaultdict(list)
    for path, kind in kinds.items():
        by_kind[kind].append(path)

    def tensor_row(kind: str) -> tuple[int, int, int]:
        readers = [c for c in convs if read[c] == kind]
        acts = sum(p in outputs for p in by_kind[kind]) + sum(c in inputs for c in readers)
        return len(by_kind[kind]), 0, acts

    def conv_row(selected: list[str]) -> tuple[int, int, int]:
        return len(selected), sum(c in weights for c in selected), sum(c in inputs for c in selected)

    return {
        "first conv (image)": conv_row(convs[:1]),
        "hard-swish outputs": tensor_row("hswish"),
        "ReLU outputs (outside SE)": tensor_row("relu"),
        "SE convs": conv_row([c for c in convs if ".se." in c]),
        "SE ReLU outputs": tensor_row("se_relu"),
        "SE gates (h-sigmoid)": tensor_row("gate"),
        "SE-scaled features (x * gate)": tensor_row("se_scaled"),
        "classifier convs": conv_row([c for c in convs if c.startswith("output.")]),
        "all Conv2d": conv_row(convs),
    }


# (modules, weight quantizers, activation quantizers) per row; see docs/quantizer.md
EXPECTED = {
    "dfq_legacy": {"first conv (image)": (1, 1, 0), "hard-swish outputs": (21, 0, 21),
                   "ReLU outputs (outside SE)": (11, 0, 11), "SE convs": (16, 16, 0),
                   "SE ReLU outputs": (8, 0, 8), "SE gates (h-sigmoid)": (8, 0, 0),
                   "SE-scaled features (x * gate)": (8, 0, 0), "classifier convs": (2, 2, 0),
                   "all Conv2d": (64, 64, 0)},
    # layer_input: a tensor is quantized where a conv reads it. 6 h-swish and 3 ReLU outputs feed
    # an SE block, whose pooled input and scaled output are quantized at the SE / projection convs.
    "academic": {"first conv (image)": (1, 1, 1), "hard-swish outputs": (21, 0, 15),
                 "ReLU outputs (outside SE)": (11, 0, 8), "SE convs": (16, 16, 16),
                 "SE ReLU outputs": (8, 0, 8), "SE gates (h-sigmoid)": (8, 0, 0),
                 "SE-scaled features (x * gate)": (8, 0, 8), "classifier convs": (2, 2, 2),
                 "all Conv2d": (64, 64, 64)},
}


@pytest.mark.parametrize("preset", ["dfq_legacy", "academic"])
def test_mobilenetv3_quantizer_coverage(preset):
    table = coverage(preset)
    assert table == EXPECTED[preset]


def test_mobilenetv3_describe_totals_and_bits():
    from calibbench import quant
    from calibbench.config import QuantConfig

    model = mobilenetv3()
    legacy = quant.describe(quant.quantize(model, QuantConfig(name="dfq_legacy"), 6, 6))
    assert (legacy["num_weight_quantizers"], legacy["num_act_quantizers"]) == (64, 40)  # 21 h-swish + 19 ReLU
    assert all(bits == 6 for _, _, bits in legacy["quantizers"])
    academic = quant.describe(quant.quantize(model, QuantConfig(
        name="academic", act_placement="layer_input", fold_bn=True, first_last_bits=8, quantize_input=True), 6, 6))
    assert (academic["num_weight_quantizers"], academic["num_act_quantizers"], academic["folded_bn"]) == (64, 64, 46)
    eight = sorted(p for p, _, bits in academic["quantizers"] if bits == 8)
    assert eight == ["features.init_block.conv.input_quantizer", "features.init_block.conv.weight_quantizer",
                     "output.conv2.input_quantizer", "output.conv2.weight_quantizer"]  # image and 1000-way classifier


def test_academic_bn_folding_preserves_mobilenetv3_outputs():
    """All 46 conv/BN pairs fold, and the folded FP network computes the same logits. BN
    statistics and affine parameters are randomised first: at init (mean 0, var 1, weight 1,
    bias 0) folding would be the identity and the test could not fail."""
    from calibbench.quant.quantize import fold_bn

    model = mobilenetv3()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    x = torch.randn(4, 3, 224, 224, generator=g)
    import copy

    folded = copy.deepcopy(model)
    pairs = fold_bn(folded)
    assert len(pairs) == 46 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        ref, out = model(x), folded(x)
    scale = ref.abs().max()
    assert scale > 1e-3 and (out - ref).abs().max() <= 1e-4 * scale  # float32 reassociation only


if __name__ == "__main__":
    print("| module group | in mobilenetv3 | dfq_legacy: weight q. | dfq_legacy: act. q. | "
          "academic: weight q. | academic: act. q. |")
    print("|---|---|---|---|---|---|")
    tables = {p: coverage(p) for p in ("dfq_legacy", "academic")}
    for row in ROWS:
        n, w1, a1 = tables["dfq_legacy"][row]
        _, w2, a2 = tables["academic"][row]
        print(f"| {row} | {n} | {w1} | {a1} | {w2} | {a2} |")
