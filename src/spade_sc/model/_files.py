"""Model folders: ``model.safetensors`` (every tensor, no pickle) + ``config.json`` (everything else)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def versions() -> dict[str, str]:
    """Versions of spade_sc and the libraries a model depends on (recorded next to results and in model files)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spade_sc", "torch", "timm", "lightning", "scanpy", "spatialdata", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "absent"
    return out


def write_model_folder(
    path: str | Path, tensors: Mapping[str, Any], config: Mapping[str, Any], *, overwrite: bool
) -> Path:
    """Write ``tensors`` (torch tensors) and ``config`` (JSON-safe) into the folder ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        if not overwrite:
            msg = f"{path} exists; pass overwrite=True to replace it."
            raise FileExistsError(msg)
        shutil.rmtree(path)
    path.mkdir(parents=True)
    save_file(dict(tensors), str(path / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    (path / CONFIG_FILE).write_text(json.dumps(dict(config), indent=1))
    return path


def read_model_folder(path: str | Path, class_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, tensors) of a folder written by :func:`write_model_folder`, after checking files, format and class."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            msg = f"The model folder {path} lacks {name}."
            raise FileNotFoundError(msg)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        msg = (
            f"{path / CONFIG_FILE} has format_version {config.get('format_version')!r}; this spade_sc reads "
            f"format {FORMAT_VERSION}."
        )
        raise ValueError(msg)
    if config.get("class") != class_name:
        msg = f"{path} holds a {config.get('class')!r}, not a {class_name}."
        raise ValueError(msg)
    return config, load_file(str(path / WEIGHTS_FILE))
