"""Start a UDATVGG from VGG16 weights: torchvision's layout or VGG-Face's conv1_1…fc8 naming.

The conv layers (and BatchNorm layers, when both sides have them) are matched by their order in
the network, so vgg16 weights load into a vgg16_bn-shaped model and vice versa; the first two FC
layers load into FC1 and FC2 (a (4096, 512, 7, 7) FC weight of a converted Caffe model is
reshaped). The 1000- or 2622-way class layer is never loaded. A tensor whose shape does not fit
(another width or input size) is skipped, and the report says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["LoadReport", "load_pretrained", "check_pretrained"]

_TORCHVISION = re.compile(r"^(features)\.(\d+)\.(\w+)$")
_TORCHVISION_FC = {"classifier.0": "fc1", "classifier.3": "fc2"}
_VGGFACE_CONV = re.compile(r"^conv(\d)_(\d)\.(\w+)$")
_VGGFACE_FC = {"fc6": "fc1", "fc7": "fc2"}
_CLASS_LAYERS = ("classifier.6", "fc8")


@dataclass
class LoadReport:
    """Which source keys were loaded (as is or reshaped) and which were skipped, and why."""

    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, reshaped {len(self.reshaped)}, "
                 f"skipped {len(self.skipped)}"]
        lines += [f"  reshaped {key}" for key in self.reshaped]
        lines += [f"  skipped  {key}: {why}" for key, why in self.skipped]
        return "\n".join(lines)


_REMEDY = ("pass VGG16 weights saved with torch.save: torchvision's vgg16 / vgg16_bn layout "
           "(features.N.*, classifier.N.*) or VGG-Face's conv1_1 … fc8 names")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (weights_only: no code runs while reading it)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file; {_REMEDY}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path}: cannot read it as a PyTorch state dict "
                         f"({type(error).__name__}{': ' + cause if cause else ''}); "
                         f"{_REMEDY}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict; {_REMEDY}")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def check_pretrained(path) -> None:
    """Raise ValueError (naming the file, the cause and the remedy) unless `path` is a state
    dict with VGG16 conv layers in a layout `load_pretrained` reads."""
    path = Path(path)
    convs, _, _, _ = _source_layers(_read_state_dict(path))
    if not convs:
        raise ValueError(f"{path}: no VGG16 conv layers found; {_REMEDY}")


def _source_layers(state: dict[str, torch.Tensor]):
    """Group source keys -> (convs, batchnorms, fcs, unknown), convs/BNs in network order.

    convs, batchnorms: lists of {param name: tensor} with the source key prefix under "_prefix";
    fcs: {our FC name: that dict}.
    """
    groups: dict[tuple, dict] = {}
    fcs, unknown = {}, []
    for key, tensor in state.items():
        if m := _TORCHVISION.match(key):
            order, param = (0, int(m.group(2))), m.group(3)
            prefix = f"features.{m.group(2)}"
        elif m := _VGGFACE_CONV.match(key):
            order, param = (int(m.group(1)), int(m.group(2))), m.group(3)
            prefix = f"conv{m.group(1)}_{m.group(2)}"
        else:
            prefix, _, param = key.rpartition(".")
            ours = _TORCHVISION_FC.get(prefix) or _VGGFACE_FC.get(prefix)
            if ours is not None:
                fcs.setdefault(ours, {"_prefix": prefix})[param] = tensor
            else:
                unknown.append(key)
            continue
        groups.setdefault(order, {"_prefix": prefix})[param] = tensor
    convs, batchnorms = [], []
    for order in sorted(groups):
        layer = groups[order]
        if "running_mean" in layer:
            batchnorms.append(layer)
        elif layer.get("weight") is not None and layer["weight"].dim() == 4:
            convs.append(layer)
        else:
            unknown += [f"{layer['_prefix']}.{p}" for p in layer if p != "_prefix"]
    return convs, batchnorms, fcs, unknown


def _copy_layer(source: dict, target: nn.Module, target_name: str, report: LoadReport,
                allow_reshape: bool = False) -> None:
    own = dict(target.named_parameters(recurse=False)) | dict(target.named_buffers(recurse=False))
    for param, tensor in source.items():
        if param == "_prefix":
            continue
        key = f"{source['_prefix']}.{param}"
        dest = own.get(param)
        if dest is None:
            report.skipped.append((key, f"{target_name} has no {param}"))
        elif dest.shape == tensor.shape:
            with torch.no_grad():
                dest.copy_(tensor)
            report.loaded.append(key)
        elif allow_reshape and dest.numel() == tensor.numel():
            with torch.no_grad():
                dest.copy_(tensor.reshape(dest.shape))
            report.loaded.append(key)
            report.reshaped.append(f"{key} {tuple(tensor.shape)} -> {tuple(dest.shape)}")
        else:
            report.skipped.append((key, f"shape {tuple(tensor.shape)} does not fit "
                                        f"{target_name}.{param} {tuple(dest.shape)}"))


def load_pretrained(model: nn.Module, path) -> LoadReport:
    """Copy VGG16 weights from the state dict at `path` into `model` (a UDATVGG) in place."""
    path = Path(path)
    convs, batchnorms, fcs, unknown = _source_layers(_read_state_dict(path))
    report = LoadReport()
    ours = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    our_convs = [(n, m) for n, m in ours if isinstance(m, nn.Conv2d)]
    our_bns = [(n, m) for n, m in ours if isinstance(m, nn.BatchNorm2d)]
    if not convs:
        raise ValueError(f"{path}: no VGG16 conv layers found; {_REMEDY}")
    for source, (name, module) in zip(convs, our_convs):
        _copy_layer(source, module, name, report)
    for source in convs[len(our_convs):]:
        report.skipped.append((source["_prefix"], "the model has fewer conv layers"))
    for source, (name, module) in zip(batchnorms, our_bns):
        _copy_layer(source, module, name, report)
    if batchnorms and not our_bns:
        report.skipped += [(b["_prefix"], "the model has no BatchNorm") for b in batchnorms]
    for ours_name, source in fcs.items():
        _copy_layer(source, getattr(model, ours_name), ours_name, report, allow_reshape=True)
    for key in unknown:
        reason = ("the class layer is not loaded" if key.startswith(_CLASS_LAYERS)
                  else "not a VGG16 layer")
        report.skipped.append((key, reason))
    return report
