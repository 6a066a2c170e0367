"""Allocation that does not page-fault every batch: a scoped tuning of glibc's ``malloc`` for tensor loops.

Every forward pass of an encoder on CPU allocates activation tensors of tens to hundreds of MB. Above glibc's mmap
threshold (128 KiB at start, raised by glibc itself to at most 32 MiB) each of them is mapped, page-faulted and zeroed
by the kernel, then unmapped when it is freed, batch after batch: on EfficientNet-Lite0 this costs about as much as
the convolutions. :func:`keep_freed_memory` raises glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` within a
``with`` block, so that freed activation memory stays in the heap and the next batch reuses it without faults, and
on leaving calls ``malloc_trim(0)`` (freed memory goes back to the system) and sets the thresholds back.

What "back" means: glibc has no call that reads its thresholds, and any ``mallopt`` of them switches its dynamic
threshold off for the rest of the process. On leaving, the thresholds are set to where glibc's dynamic rule settles
once a block of 32 MiB or more has been freed (mmap 32 MiB, trim 64 MiB), which every torch process reaches after
its first large tensor: the memory retained afterwards is what default glibc retains.

Where nothing is changed (the block runs as is):

- the tuning is switched off: ``enabled=False`` or the environment variable ``SPADE_SC_TUNE_MALLOC=0``;
- not glibc (macOS, Windows, musl): the symbols are missing; nothing breaks, the gain is absent there (macOS's
  allocator keeps large freed blocks for reuse by itself);
- the user tuned glibc already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
  ``MALLOC_MMAP_MAX_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``): their choice stands;
- jemalloc or tcmalloc is loaded (e.g. ``LD_PRELOAD``): they reuse freed memory already;
- inside another such block, which decides (blocks nest, across threads too: the first to enter sets the
  thresholds, the last to leave restores them).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("spade_sc")

__all__ = ["ENV_VAR", "keep_freed_memory", "malloc_tuning_available", "tuning_enabled"]

#: Environment variable switching the tuning off (``0``, ``off``, ``false``, ``no``) or on (anything else).
ENV_VAR = "SPADE_SC_TUNE_MALLOC"
#: Thresholds within the block (bytes): blocks up to 1 GiB come from the heap and stay there when freed.
TUNED_BYTES = 1 << 30
#: glibc's ceiling of its dynamic mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
DYNAMIC_MMAP_MAX = 32 << 20

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OFF = {"0", "off", "false", "no"}
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_depth = 0
_active = False  # whether the thresholds are raised now
_libc: ctypes.CDLL | bool | None = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc with ``mallopt`` and ``malloc_trim``; None otherwise."""
    global _libc
    if _libc is not False:
        return _libc  # type: ignore[return-value]
    lib = None
    if sys.platform.startswith("linux"):
        try:
            cand = ctypes.CDLL(None)
            if all(hasattr(cand, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
                cand.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                cand.mallopt.restype = ctypes.c_int
                cand.malloc_trim.argtypes = [ctypes.c_size_t]
                cand.malloc_trim.restype = ctypes.c_int
                lib = cand
        except (OSError, AttributeError):  # pragma: no cover - exotic platforms
            lib = None
    _libc = lib
    return lib


def _user_tuned() -> bool:
    """Whether glibc's malloc was tuned through the environment before the process started."""
    if any(os.environ.get(v) for v in _USER_ENV):
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _other_allocator() -> str | None:
    """The name of a replacement allocator mapped into this process (jemalloc, tcmalloc, mimalloc), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((name for name in _OTHER_ALLOCATORS if f"lib{name}" in maps), None)


def tuning_enabled(enabled: bool | None = None) -> bool:
    """``enabled`` when given, else whether :data:`ENV_VAR` leaves the tuning on (its default)."""
    if enabled is not None:
        return bool(enabled)
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def malloc_tuning_available() -> str | None:
    """None when :func:`keep_freed_memory` can tune this process's allocator, else the reason why not."""
    if _glibc() is None:
        return "the C library is not glibc"
    if _user_tuned():
        return "glibc's malloc is tuned through the environment already"
    other = _other_allocator()
    if other is not None:
        return f"{other} is loaded"
    return None


def _set(lib: ctypes.CDLL, mmap_threshold: int, trim_threshold: int) -> bool:
    ok_trim = lib.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    ok_mmap = lib.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    if not ok_mmap and mmap_threshold > DYNAMIC_MMAP_MAX:  # older glibc caps the threshold at 32 MiB
        ok_mmap = lib.mallopt(_M_MMAP_THRESHOLD, DYNAMIC_MMAP_MAX) == 1
    return ok_trim and ok_mmap


@contextlib.contextmanager
def keep_freed_memory(enabled: bool | None = None) -> Iterator[bool]:
    """Keep freed large blocks in the heap for reuse within the block (glibc only); trim and restore on leaving.

    Blocks nest, also across threads: the first to enter decides (from ``enabled``) and the tuning lasts until the
    last one has left, which restores the thresholds and trims.

    Parameters
    ----------
    enabled
        Tune (True), leave the allocator alone (False), or None: tune unless the environment variable
        ``SPADE_SC_TUNE_MALLOC`` is ``0`` / ``off`` / ``false`` / ``no``.

    Yields
    ------
    bool
        Whether the allocator is tuned within the block.
    """
    global _depth, _active
    with _lock:
        _depth += 1
        if _depth == 1 and tuning_enabled(enabled):
            reason = malloc_tuning_available()
            lib = _glibc()
            if reason is None and lib is not None:
                _active = _set(lib, TUNED_BYTES, TUNED_BYTES)
                if not _active:
                    logger.debug("keep_freed_memory: mallopt refused the thresholds")
            else:
                logger.debug("keep_freed_memory: allocator left alone (%s)", reason)
        active = _active
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _active:
                lib = _glibc()
                if lib is not None:
                    _set(lib, DYNAMIC_MMAP_MAX, 2 * DYNAMIC_MMAP_MAX)
                    lib.malloc_trim(0)
                _active = False
