"""torchvision classification models: names, construction, pretrained weights, head replacement.

``--weights DEFAULT`` (or a weights name) goes through torchvision's own weights API, which reads
the file from the torch hub cache; ``download.fetch_weights`` puts it there first when it is
missing (hash-checked, atomically), or, offline, names the URL, the file and the folder.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from wnconvert.convert.errors import UserInputError
from wnconvert.models.zoo.unpickle import load_restricted

from .download import fetch_weights

# Models built with a fixed input resolution; every other model takes any size >= its minimum.
FIXED_SIZE = {"maxvit_t": 224}
MIN_SIZE = {"inception_v3": 75, "googlenet": 32}
NO_AUX = ("googlenet", "inception_v3")


def list_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    names = list_models()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `wnconvert models` for the list"
    raise UserInputError(f"unknown model {name!r}{hint}")


def fixed_image_size(name: str) -> int | None:
    if name.startswith("vit_"):
        return 224
    return FIXED_SIZE.get(name)


def min_image_size(name: str) -> int:
    return fixed_image_size(name) or MIN_SIZE.get(name, 32)


@dataclass
class BuiltModel:
    model: nn.Module
    name: str
    weights: str                 # what was loaded, for the manifest
    num_classes: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_size: int | None = None   # from the pretrained weights' eval transform
    crop_size: int | None = None


def _construct(name: str, **kwargs) -> nn.Module:
    if name in NO_AUX:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(name, **kwargs)


def build_model(name: str, weights: str = "none", num_classes: int | None = None,
                offline: bool | None = None) -> BuiltModel:
    """``weights``: ``none``, ``DEFAULT``, a torchvision weights name, or a local file
    (``.pth``/``.pt`` state_dict, ``.safetensors``). ``num_classes`` other than the weights'
    replaces the classifier head (a fresh layer). ``offline`` forbids downloading torchvision
    weights missing from the hub cache (None: the ``WNCONVERT_OFFLINE`` environment variable)."""
    name = check_model_name(name)
    spec = weights.strip()
    if spec.lower() == "none":
        k = num_classes or 1000
        return BuiltModel(_construct(name, num_classes=k), name, "none", k)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors") or path.exists():
        return _from_file(name, path, num_classes)
    return _from_torchvision(name, spec, num_classes, offline)


def _from_torchvision(name: str, spec: str, num_classes: int | None,
                      offline: bool | None = None) -> BuiltModel:
    enum = torchvision.models.get_model_weights(name)
    key = spec.split(".")[-1]
    if key == "DEFAULT":
        w = enum.DEFAULT
    elif key in enum.__members__:
        w = enum[key]
    else:
        raise UserInputError(f"unknown weights {spec!r} for {name}; choose DEFAULT, "
                             f"{', '.join(enum.__members__)}, none, or a .pth/.safetensors file")
    cached = fetch_weights(w.url, offline)
    try:
        model = _construct(name, weights=w)
    except Exception as e:
        raise UserInputError(f"cannot load {cached}: {str(e).splitlines()[0]}") from None
    k = len(w.meta["categories"])
    built = BuiltModel(model, name, str(w), k)
    tf = w.transforms()
    built.mean, built.std = tuple(tf.mean), tuple(tf.std)
    built.resize_size, built.crop_size = _first(tf.resize_size), _first(tf.crop_size)
    if num_classes and num_classes != k:
        replace_head(model, k, num_classes)
        built.num_classes = num_classes
    return built


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UserInputError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = load_restricted(path)
    except UserInputError:
        raise
    except Exception as e:
        raise UserInputError(f"cannot read weights file {path}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserInputError(f"weights file {path} does not hold a state_dict of tensors")
    meta = getattr(sd, "_metadata", None)
    out = OrderedDict((k.removeprefix("module."), v) for k, v in sd.items())
    if meta is not None:
        out._metadata = OrderedDict((k.removeprefix("module."), v) for k, v in meta.items())
    return out


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``, also for files without module versions.

    Some modules check the version recorded in a state_dict's ``_metadata`` (torchvision's MNASNet
    refuses to load without one); safetensors files and re-keyed dicts carry none, so a state
    without metadata is taken to be of the current versions.
    """
    own = model.state_dict()
    ordered = OrderedDict(state)
    ordered._metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)
    model.load_state_dict(ordered, strict=True)


def _from_file(name: str, path: Path, num_classes: int | None) -> BuiltModel:
    sd = load_state_file(path)
    probe = _construct(name)
    head_name, head = find_head(probe)
    head_key = f"{head_name}.weight"
    if head_key not in sd:
        raise UserInputError(f"weights file {path} does not fit {name}: no {head_key}")
    file_classes = sd[head_key].shape[0]
    model = _construct(name, num_classes=file_classes)
    _load(model, sd, path, name)
    built = BuiltModel(model, name, str(path), file_classes)
    if num_classes and num_classes != file_classes:
        replace_head(model, file_classes, num_classes)
        built.num_classes = num_classes
    return built


def _load(model: nn.Module, sd: dict, path: Path, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise UserInputError(f"weights file {path} does not fit {name}: {'; '.join(parts)} keys")
    load_into(model, sd)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last Linear (or 1x1 Conv, as in SqueezeNet) in module order."""
    head = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            head = (name, m)
    if head is None:
        raise UserInputError("cannot find a classifier layer to replace")
    return head


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> None:
    name, head = find_head(model)
    out = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if out != old_classes:
        raise UserInputError(f"cannot find the classifier: last layer {name} has {out} outputs")
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    else:
        new = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride,
                        head.padding, bias=head.bias is not None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
