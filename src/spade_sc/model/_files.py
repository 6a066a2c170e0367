"""Model folders: ``model.safetensors`` (every tensor, no pickle) + ``config.json`` (everything else)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import atomic_path
from .._validation import file_errors, json_safe, read_json
from ._schema import FORMAT_VERSION, check_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The files of a model folder.
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)
#: Records ``spade-sc fit`` keeps beside the model files (a folder holding them is still a model folder).
RUN_FILES = ("run.json", "spade-sc.log", "failures.csv")


def versions(*extra: str) -> dict[str, str]:
    """Versions of Python, spade_sc and the libraries a model depends on, plus the packages ``extra``.

    Recorded next to results, in model files and in the records of cohort runs.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("spade_sc", "torch", "timm", "lightning", "scanpy", "spatialdata", "scikit-learn", "numpy", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "absent"
    return out


def check_model_folder(path: str | Path) -> None:
    """Refuse to replace ``path`` unless it is a model folder: only a model's files and the run records beside them.

    A model folder holds ``config.json`` and ``model.safetensors``, and may hold the records that ``spade-sc fit``
    keeps with the model (:data:`RUN_FILES`); an empty folder, or one holding only those records, may be replaced
    too. Anything else (a file, a folder
    holding other files or subfolders) is a :class:`FileExistsError` naming what is there.
    """
    path = Path(path)
    if not path.is_dir():
        msg = f"{path} exists and is not a folder; refusing to replace it with a model folder."
        raise FileExistsError(msg)
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if n not in (*MODEL_FILES, *RUN_FILES)]
    if foreign:
        msg = (
            f"{path} holds files that are not a model's ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to delete it. Choose another folder."
        )
        raise FileExistsError(msg)
    if any(n in MODEL_FILES for n in names) and CONFIG_FILE not in names:
        msg = f"{path} is not a model folder (no {CONFIG_FILE}); refusing to replace it."
        raise FileExistsError(msg)


def write_model_folder(
    path: str | Path,
    tensors: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    overwrite: bool,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``tensors`` (torch tensors) and ``config`` (JSON-safe) into the folder ``path``, atomically.

    The folder is built under a temporary name beside ``path`` and swapped into place when complete, so a kill
    leaves the old folder or the new one. With ``overwrite``, an existing ``path`` is replaced only when it is a
    model folder (see :func:`check_model_folder`). ``extra_files`` (``{name: text or bytes}``, names among
    :data:`RUN_FILES`) are written beside the model files.
    """
    from safetensors.torch import save_file

    unknown = sorted(set(extra_files or {}) - set(RUN_FILES))
    if unknown:
        msg = f"extra_files {unknown} are not among the run records {RUN_FILES}."
        raise ValueError(msg)
    path = Path(path)
    with atomic_path(path, overwrite=overwrite, check=check_model_folder) as tmp:
        tmp.mkdir()
        save_file(dict(tensors), str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        # json_safe: records read back from zarr (e.g. an encoder spec in uns) hold numpy arrays
        (tmp / CONFIG_FILE).write_text(json.dumps(json_safe(dict(config)), indent=1))
        for name, data in (extra_files or {}).items():
            target = tmp / name
            target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    return path


def read_model_folder(path: str | Path, class_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, tensors) of a folder written by :func:`write_model_folder`, after checking files, format and schema.

    A config that is not JSON, a weights file that safetensors cannot parse, and a config that does not follow the
    schema of ``class_name`` (:func:`spade_sc.model._schema.check_config`: required keys, types, ranges, key names,
    the tensor shapes it implies) are each a ``ValueError`` naming the file; nothing is built before they pass.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        msg = f"The model folder {path} does not exist or is not a folder."
        raise FileNotFoundError(msg)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            msg = f"The model folder {path} lacks {name}."
            raise FileNotFoundError(msg)
    config = read_json(path / CONFIG_FILE, "model config")
    with file_errors(path / WEIGHTS_FILE, "model weights file"):
        tensors = load_file(str(path / WEIGHTS_FILE))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    check_config(config, class_name, path / CONFIG_FILE, shapes=shapes)
    return config, tensors
