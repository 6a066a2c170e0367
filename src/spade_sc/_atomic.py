"""Atomic writes: build a file or folder under a temporary name beside its target, then swap it into place.

A process killed at any moment leaves either the old output or the new one at the target path, never a half-written
one; what it leaves behind is a temporary whose name holds :data:`TMP_MARK` and the writer's process id, removed by
:func:`remove_stale` on the next run. Folders are swapped with Linux's ``renameat2(RENAME_EXCHANGE)`` (one atomic
step, the old folder then deleted); elsewhere the old folder is moved aside first (two renames).

Used by the cohort command line (per-slide ``.zarr``, ``run.json``, ``failures.csv``), the model folders
(:func:`spade_sc.model._files.write_model_folder`) and the training checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "atomic_path",
    "remove_stale",
    "write_bytes_atomic",
    "write_sdata_atomic",
    "write_text_atomic",
]

#: Part of the name of every temporary this module makes: ``.<target name>.spade-tmp-<pid>-<random>``.
TMP_MARK = ".spade-tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_sibling(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path`` (same folder, so that a rename never crosses file systems)."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_path(tmp: Path, path: Path) -> None:
    """Put the finished ``tmp`` at ``path``, replacing what is there as atomically as the system allows."""
    if not path.exists() and not path.is_symlink():
        os.replace(tmp, path) if tmp.is_file() else os.rename(tmp, path)
        return
    if tmp.is_file() and not path.is_dir():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):  # tmp now holds the old output
        _remove(tmp)
        return
    old = temp_sibling(path)
    os.rename(path, old)
    os.rename(tmp, path)
    _remove(old)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = False, check: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Context manager yielding a temporary path to write ``path``'s new content to (a file or a folder).

    On a clean exit the temporary replaces ``path``; on an exception it is removed and ``path`` stays as it was.

    Parameters
    ----------
    path
        The target.
    overwrite
        Replace an existing target (otherwise it is a :class:`FileExistsError`, raised before anything is written).
    check
        Called with ``path`` when it exists, before anything is written: raises to refuse the replacement.

    Yields
    ------
    The temporary path (its parent folder exists; the path itself does not).
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            msg = f"{path} exists; pass overwrite=True to replace it."
            raise FileExistsError(msg)
        if check is not None:
            check(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the file ``path`` atomically (replacing it); returns the path."""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to the file ``path`` atomically (replacing it); returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_sdata_atomic(sdata: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``sdata.write(path)`` through a temporary folder: a kill leaves the old ``.zarr`` or the new one.

    Parameters
    ----------
    sdata
        The SpatialData to write (every element; lazy images are computed chunk by chunk by spatialdata).
    path
        The ``.zarr`` folder.
    overwrite
        Replace an existing folder.

    Returns
    -------
    The path.
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings():  # zarr announces a future default at every array written
            warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
            sdata.write(tmp)
    return Path(path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries left in ``folder`` by writers that are no longer running; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if TMP_MARK not in entry.name:
            continue
        try:
            pid = int(entry.name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid > 0 and _pid_alive(pid) and pid != os.getpid():
            continue  # another live process is writing it (e.g. a Dask worker of a concurrent run)
        _remove(entry)
        removed.append(entry)
    return removed
