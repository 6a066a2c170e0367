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
