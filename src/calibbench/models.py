"""Model factory: pytorchcv or torchvision architectures with pretrained or local weights."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calibbench.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    module: nn.Module
    weights_source: str  # a file path, "pytorchcv-pretrained", "torchvision-DEFAULT" or "none"
    weights_id: str  # sha256 of the state dict: part of every cache key


def _architecture(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    if cfg.source == "pytorchcv":
        from pytorchcv.model_provider import get_model

        try:
            return get_model(cfg.arch, pretrained=pretrained)
        except ValueError as err:
            raise ConfigError(f"pytorchcv has no model {cfg.arch!r} (model.arch); see "
                              f"pytorchcv.model_provider for the list: {err}") from err
    import torchvision

    valid = torchvision.models.list_models()
    if cfg.arch not in valid:
        raise ConfigError(f"torchvision has no model {cfg.arch!r}; valid choices: {', '.join(valid)}")
    return torchvision.models.get_model(cfg.arch, weights="DEFAULT" if pretrained else None)


def state_dict_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


_EXPECTED = ("a PyTorch state-dict file (torch.save(model.state_dict(), PATH): a dict of tensors, "
             "optionally under 'state_dict')")


def _read_state_dict(path: Path, cfg: ModelConfig) -> dict:
    """The file's state dict, loaded with ``weights_only=True`` (tensors only, nothing executed).
    Any failure is one ConfigError naming the file and what was expected: torch's own messages
    ("PytorchStreamReader failed ... miniz error", or advice to retry with ``weights_only=False``,
    unsafe for a file nobody vouched for) never reach the user."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # zip/pickle/unpickler errors come in many types
        size = path.stat().st_size
        what = ("is empty" if size == 0 else "is truncated or not a PyTorch file (no complete zip archive)"
                if not zipfile.is_zipfile(path) else "is damaged or holds objects other than tensors")
        raise ConfigError(f"model {cfg.name!r}: weights file {str(path)!r} ({size} bytes) {what}; expected "
                          f"{_EXPECTED}. Re-download or re-save it; a file from an untrusted source "
                          f"is never loaded with code execution") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model {cfg.name!r}: weights file {str(path)!r} holds a "
                          f"{type(state).__name__}, not {_EXPECTED}")
    return state


def _load_file(module: nn.Module, path: Path, cfg: ModelConfig) -> None:
    if not path.is_file():
        raise ConfigError(
            f"model {cfg.name!r}: weights file {str(path)!r} does not exist. Pass model.weights=PATH "
            f"to a state-dict file, or model.weights=pretrained to download {cfg.source} weights")
    state = _read_state_dict(path, cfg)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"weights file {str(path)!r} does not match model {cfg.name!r} ({cfg.arch}): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}")
    module.load_state_dict(state)


def build(cfg: ModelConfig, dataset_name: str, weights_dir: str) -> BuiltModel:
    """Build the FP model in eval mode. ``weights``: auto | pretrained | none | PATH."""
    choice = cfg.weights
    if choice == "auto":
        local = cfg.local_weights.get(dataset_name)
        if local is not None:
            path = Path(weights_dir) / local
            if not path.is_file():
                raise ConfigError(
                    f"model {cfg.name!r} on dataset {dataset_name!r} uses the local weights file "
                    f"{str(path)!r}, which does not exist. Set paths.weights_dir (or "
                    f"CALIBBENCH_WEIGHTS_DIR) to the folder that holds it, pass model.weights=PATH, "
                    f"or model.weights=pretrained to download {cfg.source} weights")
            choice = str(path)
        else:
            choice = "pretrained"
    if choice == "none":
        module, source = _architecture(cfg, pretrained=False), "none"
    elif choice == "pretrained":
        try:
            module = _architecture(cfg, pretrained=True)
        except ConfigError:
            raise
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError)
            raise ConfigError(
                f"model {cfg.name!r}: no weights reachable. Downloading {cfg.source} pretrained "
                f"weights failed ({type(err).__name__}: {err}). Either connect to the internet for "
                f"the download, or pass model.weights=PATH to a local state-dict file") from err
        source = f"{cfg.source}-pretrained"
    else:
        module = _architecture(cfg, pretrained=False)
        _load_file(module, Path(choice), cfg)
        source = choice
    module.eval()
    out_features = _num_outputs(module, cfg.input_size)
    if out_features != cfg.num_classes:
        raise ConfigError(f"model {cfg.name!r} ({cfg.arch}) outputs {out_features} classes, "
                          f"its config says model.num_classes={cfg.num_classes}")
    log.info("model %s (%s/%s), weights: %s", cfg.name, cfg.source, cfg.arch, source)
    return BuiltModel(module, source, state_dict_hash(module))


def _num_outputs(module: nn.Module, input_size: int) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    with torch.no_grad():  # conv-only heads (squeezenet): one tiny forward pass
        return int(module(torch.zeros(1, 3, input_size, input_size)).shape[1])
