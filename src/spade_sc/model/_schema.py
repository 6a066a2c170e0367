"""The schema of the ``config.json`` of model folders: what :meth:`SpadeModel.load` and :meth:`MILModel.load` accept.

:func:`check_config` validates a config dict (read from a file, so never trusted) before any tensor or module is
built: required keys, types, ranges, choices, lengths, the tensor shapes it implies, the format version, and every
key name the model will write under (``features_key``, the encoder's name) with the rules spade_sc applies to the
names it makes (:func:`spade_sc._validation.check_key_name`). :func:`check_tensors` then compares the tensors of
``model.safetensors`` with those of the module built from a valid config. Every error is a ``ValueError`` that names
the file and the field.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import GENE_INPUTS, LOSSES, MIL_TASKS, ROUTINGS, Keys
from .._validation import check_key_name

#: Version of the model-folder format this spade_sc writes and reads.
FORMAT_VERSION = 1

__all__ = ["CONFIG_KINDS", "check_config", "check_tensors"]

#: The kinds of config :func:`check_config` knows.
CONFIG_KINDS = ("SpadeModel", "MILModel", "DataExperts")

#: ``(value, field, where) -> None``; raises a ValueError naming ``where`` and ``field``.
_Check = Callable[[Any, str, str], None]


# --------------------------------------------------------------------------------------------------------------------
# field checks
# --------------------------------------------------------------------------------------------------------------------
def _fail(where: str, field: str, value: Any, expected: str) -> None:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    msg = f"{where}: {field} is {shown} ({type(value).__name__}); expected {expected}."
    raise ValueError(msg)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(low: int = 1) -> _Check:
    def check(value: Any, field: str, where: str) -> None:
        if not _is_int(value) or value < low:
            _fail(where, field, value, f"an integer >= {low}")

    return check


def _number(low: float, high: float | None = None, *, closed_low: bool = True, closed_high: bool = False) -> _Check:
    upper = "inf)" if high is None else f"{high:g}{']' if closed_high else ')'}"
    interval = f"{'[' if closed_low else '('}{low:g}, {upper}"

    def check(value: Any, field: str, where: str) -> None:
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and (value >= low if closed_low else value > low)
        ok = ok and (high is None or (value <= high if closed_high else value < high))
        if not ok:
            _fail(where, field, value, f"a finite number in {interval}")

    return check


def _choice(choices: tuple[str, ...]) -> _Check:
    def check(value: Any, field: str, where: str) -> None:
        if not isinstance(value, str) or value not in choices:
            _fail(where, field, value, f"one of {choices}")

    return check


def _key(value: Any, field: str, where: str) -> None:
    check_key_name(value, field, where=where)


def _optional(check: _Check) -> _Check:
    def optional(value: Any, field: str, where: str) -> None:
        if value is not None:
            check(value, field, where)

    return optional


def _type(kind: type | tuple[type, ...], expected: str) -> _Check:
    def check(value: Any, field: str, where: str) -> None:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            _fail(where, field, value, expected)

    return check


def _names(value: Any, field: str, where: str) -> None:
    """A non-empty list of distinct non-empty strings."""
    if not isinstance(value, list) or not value:
        _fail(where, field, value, "a non-empty list of names")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        _fail(where, f"{field} entry", bad[0], "non-empty strings")
    if len(set(value)) != len(value):
        dup = sorted({v for v in value if value.count(v) > 1})[:5]
        msg = f"{where}: {field} holds duplicated names {dup}."
        raise ValueError(msg)


def _strings(value: Any, field: str, where: str) -> None:
    """A non-empty list of strings (repeats allowed)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        _fail(where, field, value, "a non-empty list of strings")


def _versions(value: Any, field: str, where: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        _fail(where, field, value, "a dict of package name -> version string")


def _history(value: Any, field: str, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(h, dict) for h in value):
        _fail(where, field, value, "a list of per-epoch dicts")


def _fingerprint(value: Any, field: str, where: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        _fail(where, field, value, "a SHA-256 hex digest (64 characters 0-9a-f)")


_DICT = _type(dict, "a JSON object")
_BOOL = _type(bool, "true or false")

SPADE_FIELDS: dict[str, tuple[bool, _Check]] = {
    "init_params": (True, _DICT),
    "genes": (True, _names),
    "encoder": (True, _optional(_DICT)),
    "data_experts": (True, _DICT),
    "train_params": (False, _optional(_DICT)),
    "history": (False, _optional(_history)),
    "is_trained": (False, _BOOL),
    "fingerprint": (False, _optional(_fingerprint)),
    "versions": (False, _optional(_versions)),
}
SPADE_INIT: dict[str, tuple[bool, _Check]] = {
    "image_dim": (True, _int()),
    "gene_dim": (True, _int()),
    "n_experts": (True, _int()),
    "features_key": (True, _key),
    "gene_input": (True, _choice(GENE_INPUTS)),
    "loss": (True, _choice(LOSSES)),
    "routing": (True, _choice(ROUTINGS)),
    "routing_tau": (True, _number(0, closed_low=False)),
    "proj_dim": (True, _int()),
    "dropout": (True, _number(0, 1, closed_high=True)),
    "seed": (True, _int(0)),
    "spatial_context": (False, _optional(_number(0, closed_low=False))),
}
EXPERTS_FIELDS: dict[str, tuple[bool, _Check]] = {
    "n_experts": (True, _int()),
    "features_key": (False, _optional(_key)),
    "tissue_key": (False, _optional(_type(str, "a string (an obs column or slide attribute)"))),
    "centroid_tissue": (True, _strings),
    "params": (False, _optional(_DICT)),
}
ENCODER_FIELDS: dict[str, tuple[bool, _Check]] = {
    "name": (True, _key),
    "kind": (True, _type(str, "a string")),
    "dim": (False, _int()),
}
MIL_FIELDS: dict[str, tuple[bool, _Check]] = {
    "init_params": (True, _DICT),
    "features_key": (True, _key),
    "task": (True, _choice(MIL_TASKS)),
    "classes": (False, _optional(_type(list, "a list of class labels"))),
    "bin_edges": (False, _optional(_type(list, "a list of time bin edges"))),
    "standardised": (False, _BOOL),
    "train_params": (False, _optional(_DICT)),
    "versions": (False, _optional(_versions)),
}
MIL_INIT: dict[str, tuple[bool, _Check]] = {
    "in_dim": (True, _int()),
    "n_classes": (True, _int()),
    "hidden": (True, _int()),
    "attention_dim": (True, _int()),
    "dropout": (True, _number(0, 1, closed_high=True)),
}


def _fields(data: Mapping[str, Any], fields: Mapping[str, tuple[bool, _Check]], prefix: str, where: str) -> None:
    """Every required field present, every present field valid (unknown fields are left alone)."""
    missing = [k for k, (required, _) in fields.items() if required and k not in data]
    if missing:
        what = prefix or "the config"
        msg = f"{where}: {what} lacks the required field(s) {missing} (fields present: {sorted(data)})."
        raise ValueError(msg)
    for key, (_, check) in fields.items():
        if key in data:
            check(data[key], f"{prefix}[{key!r}]" if prefix else key, where)


def _shape(
    shapes: Mapping[str, tuple[int, ...]] | None, name: str, expected: tuple[int, ...], why: str, where: str
) -> None:
    """The tensor ``name`` of the weights file has shape ``expected`` (when the shapes are known)."""
    if shapes is None:
        return
    if name not in shapes:
        msg = f"{where}: the weights file lacks the tensor {name!r} that {why} implies."
        raise ValueError(msg)
    if tuple(shapes[name]) != tuple(expected):
        msg = f"{where}: the tensor {name!r} has shape {tuple(shapes[name])}, but {why} implies {tuple(expected)}."
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------------------------
# the kinds
# --------------------------------------------------------------------------------------------------------------------
def _header(config: Mapping[str, Any], kind: str, where: str) -> None:
    version = config.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        msg = f"{where} has format_version {version!r}; this spade_sc reads format {FORMAT_VERSION}."
        raise ValueError(msg)
    if config.get("class") != kind:
        msg = f"{where} holds a {config.get('class')!r}, not a {kind}."
        raise ValueError(msg)


def _check_experts(
    data: Mapping[str, Any],
    prefix: str,
    where: str,
    shapes: Mapping[str, tuple[int, ...]] | None,
    image_dim: int | None,
) -> None:
    _fields(data, EXPERTS_FIELDS, prefix, where)
    n_centroids = len(data["centroid_tissue"])
    if n_centroids < data["n_experts"]:
        msg = (
            f"{where}: {prefix}['centroid_tissue'] lists {n_centroids} step-1 centroid(s), fewer than "
            f"{prefix}['n_experts'] = {data['n_experts']}."
        )
        raise ValueError(msg)
    dim = image_dim if image_dim is not None else (shapes or {}).get("data_experts.centroids", (0, 0))[-1]
    why = f"{prefix}['centroid_tissue'] ({n_centroids} centroids)"
    _shape(shapes, "data_experts.centroids", (n_centroids, dim), f"{why} x image_dim {dim}", where)
    _shape(shapes, "data_experts.centroid_expert", (n_centroids,), why, where)
    for name in ("centroids", "centroid_expert"):  # the JSON form of DataExperts.to_dict
        if name in data:
            arr = np.asarray(data[name], dtype=object)
            want = (n_centroids, arr.shape[-1]) if name == "centroids" else (n_centroids,)
            numeric = all(_is_number(v) for v in arr.ravel())
            if arr.ndim != len(want) or arr.shape[0] != n_centroids or not numeric:
                _fail(where, f"{prefix}[{name!r}]", data[name], f"numbers of shape {want}")


def _check_spade(config: Mapping[str, Any], where: str, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    _fields(config, SPADE_FIELDS, "", where)
    p = config["init_params"]
    _fields(p, SPADE_INIT, "init_params", where)
    if len(config["genes"]) != p["gene_dim"]:
        msg = f"{where}: genes lists {len(config['genes'])} genes but init_params['gene_dim'] is {p['gene_dim']}."
        raise ValueError(msg)
    experts = config["data_experts"]
    _check_experts(experts, "data_experts", where, shapes, p["image_dim"])
    if experts["n_experts"] != p["n_experts"]:
        msg = (
            f"{where}: data_experts['n_experts'] = {experts['n_experts']} differs from init_params['n_experts'] = "
            f"{p['n_experts']}."
        )
        raise ValueError(msg)
    encoder = config["encoder"]
    if encoder is not None:
        _fields(encoder, ENCODER_FIELDS, "encoder", where)
        check_key_name(Keys.features(encoder["name"]), "the features key of encoder['name']", where=where)
        context = p.get("spatial_context") is not None  # the input is [features, neighbours' mean]
        if "dim" in encoder and encoder["dim"] * (2 if context else 1) != p["image_dim"]:
            twice = " (twice the features with spatial_context)" if context else ""
            msg = f"{where}: encoder['dim'] = {encoder['dim']} differs from init_params['image_dim'] {p['image_dim']}"
            msg += f"{twice}."
            raise ValueError(msg)


def _check_mil(config: Mapping[str, Any], where: str, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    _fields(config, MIL_FIELDS, "", where)
    p = config["init_params"]
    _fields(p, MIL_INIT, "init_params", where)
    n_out = p["n_classes"]
    if config["task"] == "classification":
        classes = config.get("classes")
        if not isinstance(classes, list) or len(classes) < 2:
            _fail(where, "classes", classes, "a list of at least two class labels (classification)")
        if not all(isinstance(c, str | int | float | bool) for c in classes) or len(set(map(str, classes))) < len(
            classes
        ):
            _fail(where, "classes", classes, "distinct labels (strings or numbers)")
        want = (1, 2) if len(classes) == 2 else (len(classes),)  # two classes: one logit (or two, older files)
        if n_out not in want:
            msg = f"{where}: {len(classes)} classes need {want[0]} output(s), but init_params['n_classes'] is {n_out}."
            raise ValueError(msg)
    else:
        _check_bin_edges(config.get("bin_edges"), n_out, where)
    if config.get("standardised"):
        for name in ("feature_mean", "feature_std"):
            _shape(shapes, name, (p["in_dim"],), f"standardised=true with init_params['in_dim'] = {p['in_dim']}", where)


def _check_bin_edges(edges: Any, n_out: int, where: str) -> None:
    """Survival bin edges: ``n_out + 1`` non-decreasing values from 0 to ``"inf"``."""
    expected = f"{n_out + 1} non-decreasing time bin edges from 0 to 'inf' (survival, {n_out} bins)"
    if not isinstance(edges, list) or len(edges) != n_out + 1:
        _fail(where, "bin_edges", edges, expected)
    try:
        values = [float(e) for e in edges]
    except (TypeError, ValueError):
        _fail(where, "bin_edges", edges, expected)
    ok = all(_is_number(e) or e in ("inf", "Infinity") for e in edges) and values[0] == 0 and values[-1] == math.inf
    if not ok or any(b < a for a, b in itertools.pairwise(values)):
        _fail(where, "bin_edges", edges, expected)


def check_config(
    config: Any,
    kind: str,
    path: str | Path,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Validate the config of a model folder against its schema, before any tensor or module is built.

    Checks, in order: a JSON object; ``format_version`` (this spade_sc reads format :data:`FORMAT_VERSION`) and
    ``class``; every required field and the type, range or choice of every field (``init_params`` included);
    lengths that must agree (genes and ``gene_dim``, experts and centroids, classes and outputs, survival bins);
    ``features_key`` and the encoder's name as key names; and, with ``shapes``, the shapes of the tensors the
    config implies (step-1 centroids, feature standardisation). Fields that are not in the schema are ignored (a
    newer spade_sc may add some).

    Parameters
    ----------
    config
        The parsed ``config.json`` (for ``kind="DataExperts"``: the ``data_experts`` entry, or
        :meth:`DataExperts.to_dict` output).
    kind
        ``"SpadeModel"``, ``"MILModel"`` or ``"DataExperts"``.
    path
        The file (or folder) the config was read from, named in every message.
    shapes
        ``{tensor name: shape}`` of the weights file, when known (``safetensors`` headers).

    Returns
    -------
    The config, unchanged.

    Raises
    ------
    ValueError
        Naming the file and the field at fault.
    """
    if kind not in CONFIG_KINDS:
        msg = f"kind={kind!r}; choose one of {CONFIG_KINDS}."
        raise ValueError(msg)
    where = str(path)
    if not isinstance(config, Mapping):
        msg = f"{where} holds a JSON {type(config).__name__}; a JSON object is expected."
        raise ValueError(msg)
    if kind == "DataExperts":
        _check_experts(config, "data_experts", where, shapes, None)
        return dict(config) if not isinstance(config, dict) else config
    _header(config, kind, where)
    if kind == "SpadeModel":
        _check_spade(config, where, shapes)
    else:
        _check_mil(config, where, shapes)
    return dict(config) if not isinstance(config, dict) else config


#: Name of the experts' alignment tensor ``(K, d, d)`` in a SPADE weights file (absent: unaligned).
ALIGNMENT_TENSOR = "alignment.rotations"


def check_alignment(value: np.ndarray, n_experts: int, dim: int, path: str | Path) -> np.ndarray:
    """The experts' rotations of a weights file, checked: shape ``(n_experts, dim, dim)``, finite, orthogonal."""
    a = np.asarray(value, dtype=np.float32)
    if a.shape != (n_experts, dim, dim):
        msg = f"{path}: the tensor {ALIGNMENT_TENSOR!r} has shape {a.shape}, expected {(n_experts, dim, dim)}."
        raise ValueError(msg)
    eye = np.eye(dim)
    if not np.isfinite(a).all() or any(np.abs(r.astype(np.float64) @ r.T - eye).max() > 1e-3 for r in a):
        msg = f"{path}: the tensor {ALIGNMENT_TENSOR!r} does not hold orthogonal matrices (rotations)."
        raise ValueError(msg)
    return a


def check_tensors(expected: Mapping[str, Any], tensors: Mapping[str, Any], path: str | Path) -> None:
    """Check that the tensors of a weights file are those of the module built from its config, and are finite.

    Parameters
    ----------
    expected
        ``{name: tensor or array}`` the model built from the config holds.
    tensors
        ``{name: tensor}`` read from the weights file.
    path
        The weights file (or model folder), named in the message.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        msg = (
            f"{path} does not match its config: missing {missing[:10]}, unexpected {unexpected[:10]}, shape "
            f"mismatches {shapes[:10]}."
        )
        raise ValueError(msg)
    for name, t in sorted(tensors.items()):
        a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            msg = f"{path}: the tensor {name!r} holds NaN or infinite values."
            raise ValueError(msg)
