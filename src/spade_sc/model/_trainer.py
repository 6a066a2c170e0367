"""Lightning set-up shared by SPADE and MIL training: Trainer defaults, quiet logs, torch's global state restored.

Imports torch and Lightning only inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any


def default_trainer_kwargs(max_epochs: int, progress: bool, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keywords of :class:`lightning.Trainer`: one device, no logger or checkpoint files, deterministic; ``user`` wins.

    The samplers of spade_sc shard their own batches, so Lightning must not replace them
    (``use_distributed_sampler=False``).
    """
    kwargs = {
        "max_epochs": int(max_epochs),
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": bool(progress),
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
    }
    kwargs.update(user or {})
    return kwargs


@contextlib.contextmanager
def quiet_lightning(quiet: bool) -> Iterator[None]:
    """Silence Lightning's info lines (devices, tips) when ``quiet``, and its data-loader hints always."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        # no validation pairs: PairsDataModule.val_dataloader returns [] on purpose
        warnings.filterwarnings("ignore", message=r".*Total length of `list` across ranks is zero.*")
        if quiet:
            for lg in loggers:
                lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


@contextlib.contextmanager
def torch_state() -> Iterator[None]:
    """Leave torch's global settings as they were after training.

    ``Trainer(deterministic=True)`` switches deterministic algorithms on for the whole session and sets the cuBLAS
    workspace variable; the intra-op thread count is restored too.
    """
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


# --------------------------------------------------------------------------------------------------------------------
# training checkpoints: safetensors (every tensor) + JSON (the rest), no pickle, written atomically
# --------------------------------------------------------------------------------------------------------------------
#: Sub-folder of ``checkpoint_dir`` holding the checkpoint of the last finished epoch.
CHECKPOINT_FOLDER = "last"
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def flatten_state(obj: Any, prefix: str, tensors: dict[str, Any]) -> Any:
    """A JSON-safe copy of a nested state (dicts, lists, tuples, scalars, tensors); tensors go to ``tensors``.

    Tensors are replaced by ``{"__tensor__": name}``, tuples by ``{"__tuple__": [...]}``, dicts with keys that are not
    all strings by ``{"__items__": [[key, value], ...]}`` (optimizer states are keyed by parameter index), numpy
    arrays become tensors. :func:`unflatten_state` reverses it exactly.
    """
    import numpy as np
    import torch

    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}.{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten_state(v, prefix, tensors) for k, v in obj.items()}
        return {"__items__": [[k, flatten_state(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    msg = f"Cannot write a {type(obj).__name__} into a checkpoint (under {prefix!r})."
    raise TypeError(msg)


def unflatten_state(obj: Any, tensors: Mapping[str, Any]) -> Any:
    """The nested state that :func:`flatten_state` wrote."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]].clone()
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Every global random state: Python's, numpy's, torch's CPU generator and (when initialised) every CUDA one."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, keys.astype(np.int64), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (after :func:`unflatten_state`)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def write_checkpoint(folder: str | os.PathLike, tensors: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Write ``<folder>/last/`` (``checkpoint.safetensors`` + ``checkpoint.json``) atomically."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from .._atomic import atomic_path

    with atomic_path(Path(folder) / CHECKPOINT_FOLDER, overwrite=True) as tmp:
        tmp.mkdir()
        save_file(dict(tensors), str(tmp / CHECKPOINT_TENSORS), metadata={"format_version": str(CHECKPOINT_FORMAT)})
        (tmp / CHECKPOINT_JSON).write_text(json.dumps({"format_version": CHECKPOINT_FORMAT, **record}, indent=1))


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tensors, record) of the checkpoint in ``folder``; None when it holds none. Stale temporaries are removed."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from .._atomic import remove_stale

    folder = Path(folder)
    remove_stale(folder)
    last = folder / CHECKPOINT_FOLDER
    if not (last / CHECKPOINT_JSON).is_file() or not (last / CHECKPOINT_TENSORS).is_file():
        return None
    record = json.loads((last / CHECKPOINT_JSON).read_text())
    if record.get("format_version") != CHECKPOINT_FORMAT:
        found = record.get("format_version")
        msg = f"{last} holds a checkpoint of format {found!r}; this spade_sc reads format {CHECKPOINT_FORMAT}."
        raise ValueError(msg)
    return load_file(str(last / CHECKPOINT_TENSORS)), record


def signature_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two training signatures (``{"model": {...}, "training": {...}, "data": {group: hash}}``)."""
    out = []
    for part in ("model", "training"):
        a, b = stored.get(part, {}), current.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{part} {key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    a, b = stored.get("data", {}), current.get("data", {})
    added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    changed = sorted(g for g in set(a) & set(b) if a[g] != b[g])
    if added:
        out.append(f"slides added {added}")
    if removed:
        out.append(f"slides removed {removed}")
    if changed:
        out.append(f"slides whose features or expression changed {changed}")
    return out


def load_resume_state(
    checkpoint_dir: str | os.PathLike, signature: Mapping[str, Any], *, resume: bool
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The checkpoint to resume from (None: start afresh), after checking it was made by the same training.

    Raises
    ------
    FileExistsError
        A checkpoint is there and ``resume`` is False (it would be overwritten).
    ValueError
        The checkpoint was made with another model configuration, other settings or other slides (the message names
        every difference).
    """
    found = read_checkpoint(checkpoint_dir)
    if found is None:
        if resume:
            logging.getLogger("spade_sc").info("No checkpoint in %s yet: training starts at epoch 0.", checkpoint_dir)
        return None
    tensors, record = found
    if not resume:
        msg = (
            f"{checkpoint_dir} holds a checkpoint (epoch {record.get('epochs_done')}); pass resume=True (--resume) "
            "to continue it, or choose another checkpoint folder."
        )
        raise FileExistsError(msg)
    diff = signature_difference(record.get("signature", {}), signature)
    if diff:
        msg = f"The checkpoint in {checkpoint_dir} was made by another training: {'; '.join(diff[:8])}."
        raise ValueError(msg)
    logging.getLogger("spade_sc").info("Resuming from %s after epoch %d.", checkpoint_dir, record["epochs_done"] - 1)
    return tensors, record
