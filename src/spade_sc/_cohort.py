"""The cohort runner behind ``spade-sc features | embed | slides``: a manifest of slides, one task per slide.

How a run goes
--------------
- The **manifest** (CSV: ``slide_id``, ``path``, optional ``format`` and ``image``, any other columns are
  slide-level labels) is read and checked before anything is written (:func:`read_manifest`); a user error is a
  :class:`UserError` (one line, exit code 2). A Space Ranger folder without an ``image`` entry gets the one image
  file at its top as its full-resolution H&E, and each Visium slide keeps only the image its patches come from.
- Every slide is one :class:`Task`. Its output ``DIR/<slide_id>.zarr`` holds the slide's shapes and tables (images
  are not copied: they stay in the input, recorded in ``attrs["spade_sc"]["cohort"]["source"]``) and a record of
  the run in ``attrs["spade_sc"]["cohort"]``: command, parameters and a **fingerprint** of the parameters, the input
  and the upstream outputs (features, model). It is written under a temporary name and renamed into place when
  complete (:mod:`spade_sc._atomic`).
- A rerun skips the slides whose output is complete and carries the same fingerprint, redoes the others, and
  removes stale temporaries; ``--overwrite`` redoes all.
- Tasks run in this process, or on a Dask cluster (``--workers N``: a ``LocalCluster`` of N processes;
  ``--scheduler ADDRESS``: any running cluster), one task per slide; a task never raises: it returns its status.
- A failing slide is listed in ``DIR/failures.csv`` and the others go on (``--on-error skip``); ``DIR/run.json``
  records the command, parameters, versions and every slide's status and time; ``DIR/spade-sc.log`` the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ._atomic import remove_stale, write_sdata_atomic, write_text_atomic
from ._constants import Keys
from ._sdata import image_pixel_size
from ._validation import json_safe
from .model._files import versions as model_versions

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

RUN_FILE = "run.json"
FAILURES_FILE = "failures.csv"
LOG_FILE = "spade-sc.log"
#: The logger of dask.distributed (scheduler, nanny, workers, client).
DASK_LOGGER = "distributed"
#: ``sdata.attrs["spade_sc"]`` entry holding the record of the run that wrote a slide's output.
COHORT_ATTR = "cohort"
#: Input formats of a manifest's ``format`` column.
FORMATS = ("zarr", "wsi", "hest", "visium")
#: Suffixes read as whole-slide files.
WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".czi", ".jpg", ".png")
#: Suffixes of the full-resolution H&E that a Space Ranger folder may hold beside its outputs.
FULLRES_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn", ".jpg", ".jpeg", ".png")
#: Images Space Ranger writes itself (in ``spatial/``): never taken for the full-resolution H&E.
SPACERANGER_IMAGES = (
    "tissue_hires_image.png",
    "tissue_lowres_image.png",
    "aligned_fiducials.jpg",
    "detected_tissue_image.jpg",
    "aligned_tissue_image.jpg",
    "cytassist_image.tiff",
)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Manifest columns that are not slide labels.
_RESERVED = ("slide_id", "path", "format", "image")


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2, nothing written."""


# --------------------------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Slide:
    """One row of a manifest: id, where the slide is, its format, an optional full-resolution image (Visium)."""

    slide_id: str
    path: str
    format: str
    image: str | None = None


def read_manifest(
    path: str | os.PathLike, *, hest_root: str | os.PathLike | None = None
) -> tuple[list[Slide], pd.DataFrame]:
    """The slides of a manifest and its label columns (indexed by slide id), after checking the file.

    Paths are relative to the manifest's folder; a HEST sample id is a ``path`` with ``format`` ``hest`` (or any
    path that does not exist when ``hest_root`` is given). Paths that do not exist are not an error here: those
    slides fail alone (see :func:`missing_input`).

    Raises
    ------
    UserError
        The file is missing or empty, lacks ``slide_id`` / ``path``, holds duplicate or unusable slide ids, or
        unknown formats.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"The manifest {path} does not exist." if not path.exists() else f"The manifest {path} is not a file."
        raise UserError(msg)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        msg = f"The manifest {path} is empty."
        raise UserError(msg) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        msg = f"The manifest {path} is not a readable CSV: {str(err).splitlines()[0]}"
        raise UserError(msg) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("slide_id", "path") if c not in frame.columns]
    if missing:
        msg = f"The manifest {path} lacks the column(s) {missing}; it has {list(frame.columns)}."
        raise UserError(msg)
    if frame.empty:
        msg = f"The manifest {path} lists no slide."
        raise UserError(msg)
    ids = frame["slide_id"].str.strip()
    dup = sorted(ids[ids.duplicated()].unique())
    if dup:
        msg = f"The manifest {path} lists slide ids more than once: {dup[:10]}."
        raise UserError(msg)
    bad = [s for s in ids if not _SAFE_ID.match(s)]
    if bad:
        msg = f"The manifest {path} has slide ids that cannot name files (letters, digits, . _ - only): {bad[:10]}."
        raise UserError(msg)
    slides = [_slide(row, sid, path.parent, hest_root) for sid, (_, row) in zip(ids, frame.iterrows(), strict=True)]
    labels = frame.drop(columns=[c for c in _RESERVED if c in frame.columns]).set_index(ids.rename("slide_id"))
    return slides, labels


def _slide(row: pd.Series, sid: str, base: Path, hest_root: str | os.PathLike | None) -> Slide:
    raw = str(row["path"]).strip()
    fmt = str(row.get("format", "") or "").strip().lower()
    if fmt and fmt not in FORMATS:
        msg = f"Slide {sid!r}: format {fmt!r} is not one of {FORMATS}."
        raise UserError(msg)
    if not raw:
        msg = f"Slide {sid!r} has an empty path."
        raise UserError(msg)
    resolved = Path(raw) if Path(raw).is_absolute() else base / raw
    if fmt == "hest" or (not fmt and hest_root is not None and not resolved.exists()):
        return Slide(sid, raw, "hest")
    fmt = fmt or _infer_format(resolved)
    image = str(row.get("image", "") or "").strip() or None
    if image and not Path(image).is_absolute():  # relative to the manifest, or a file name inside the folder
        inside = resolved / image
        image = str(inside if not (base / image).exists() and inside.exists() else base / image)
    if fmt == "visium" and image is None and resolved.is_dir():
        image = _fullres_in(resolved, sid)
    return Slide(sid, str(resolved.resolve()), fmt, image)


def _fullres_in(folder: Path, sid: str) -> str | None:
    """The full-resolution H&E of a Space Ranger folder without an ``image`` entry: the one image file at its top.

    Space Ranger's own images (``spatial/``: hires, lowres, fiducials, CytAssist) are never candidates; several
    candidates are a :class:`UserError` (the manifest's ``image`` column must name one).
    """
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name.lower().endswith(FULLRES_SUFFIXES)
        and p.name not in SPACERANGER_IMAGES
    )
    if len(found) > 1:
        msg = (
            f"Slide {sid!r}: the Visium folder {folder} holds several image files {[p.name for p in found]}; name "
            "its full-resolution H&E in the manifest's image column."
        )
        raise UserError(msg)
    return str(found[0].resolve()) if found else None


def _infer_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zarr") or (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
        return "zarr"
    if path.is_dir():
        return "visium"
    if name.endswith(WSI_SUFFIXES) or name.endswith(".ome.tif"):
        return "wsi"
    return "zarr" if not path.exists() else "wsi"


def missing_input(slide: Slide, hest_root: str | os.PathLike | None) -> str | None:
    """Why a slide's input cannot be read at all (None when it can be tried)."""
    if slide.format == "hest":
        if hest_root is None:
            return f"slide {slide.slide_id!r} is a HEST sample id ({slide.path!r}): pass --hest-root."
        if not (Path(hest_root) / "st" / f"{slide.path}.h5ad").is_file():
            return f"HEST sample {slide.path!r} is not in {hest_root} (no st/{slide.path}.h5ad)."
        return None
    if not Path(slide.path).exists():
        return f"{slide.path} does not exist."
    return None


def load_slide(
    slide: Slide, hest_root: str | os.PathLike | None = None, *, image_key: str | None = None
) -> SpatialData:
    """The slide as SpatialData, through ``spatialdata.read_zarr`` or the readers of :mod:`spade_sc.io`.

    A Visium slide keeps one image, the one its patches are cut from (the full-resolution H&E of the ``image``
    column or of its folder, else Space Ranger's hires image), unless ``image_key`` names another of its images.
    """
    from . import io

    if slide.format == "zarr":
        import spatialdata as sd

        return sd.read_zarr(slide.path)
    if slide.format == "wsi":
        return io.read_wsi(slide.path, name=slide.slide_id)
    if slide.format == "visium":
        sdata = io.read_visium(slide.path, dataset_id=slide.slide_id, fullres_image_file=slide.image)
        return sdata if image_key in sdata.images else _patch_image_only(sdata, slide.slide_id)
    return io.read_hest(hest_root, sample_ids=[slide.path])[slide.path]


def _patch_image_only(sdata: SpatialData, dataset_id: str) -> SpatialData:
    """A Visium slide with only the image its patches are cut from: the full-resolution H&E, else the hires one.

    So that every step finds its image without ``--image-key`` (the names differ from slide to slide).
    """
    full, hires = f"{dataset_id}_full_image", f"{dataset_id}_hires_image"
    keep = full if full in sdata.images else hires if hires in sdata.images else None
    if keep is None:
        return sdata
    if keep == hires:
        try:
            size = f"{image_pixel_size(sdata, hires):.1f} um per pixel"
        except (KeyError, ValueError):
            size = "its pixel size unknown"
        logger.warning(
            "slide %s: no full-resolution H&E (no image column, no image file in its folder): patches are cut from "
            "Space Ranger's hires image, upsampled (%s).",
            dataset_id,
            size,
        )
    for key in [k for k in sdata.images if k != keep]:
        del sdata.images[key]
    return sdata


def merge_outputs(sdata: SpatialData, path: str | os.PathLike) -> SpatialData:
    """``sdata`` with the shapes, tables and records of an earlier step's output ``.zarr`` (theirs win)."""
    import spatialdata as sd

    done = sd.read_zarr(path)
    for key, shapes in done.shapes.items():
        if key in sdata.shapes:
            del sdata.shapes[key]
        sdata.shapes[key] = shapes
    for key, table in done.tables.items():
        if key in sdata.tables:
            del sdata.tables[key]
        sdata.tables[key] = table
    mine = sdata.attrs.setdefault(Keys.ATTRS, {})
    for key, value in done.attrs.get(Keys.ATTRS, {}).items():
        if key != COHORT_ATTR:
            mine[key] = value
    return sdata


def outputs_only(sdata: SpatialData, record: Mapping[str, Any]) -> SpatialData:
    """What a slide's output holds: its shapes, tables and attrs (not its images), with the run's record."""
    import copy

    from spatialdata import SpatialData

    attrs = copy.deepcopy(dict(sdata.attrs))
    attrs.setdefault(Keys.ATTRS, {})[COHORT_ATTR] = json_safe(dict(record))
    return SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables), attrs=attrs)


# --------------------------------------------------------------------------------------------------------------------
# fingerprints and records
# --------------------------------------------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(json_safe(obj), sort_keys=True, default=str).encode()).hexdigest()


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def input_signature(slide: Slide, hest_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What identifies a slide's input: its path and the size and time of its files (metadata files for folders)."""
    if slide.format == "hest":
        base = Path(hest_root or ".")
        files = [base / "st" / f"{slide.path}.h5ad", base / "metadata" / f"{slide.path}.json"]
        files += sorted((base / "wsis").glob(f"{slide.path}.*"))
        return {"hest": slide.path, "files": [_stat(f) for f in files if f.exists()]}
    path = Path(slide.path)
    sig: dict[str, Any] = {"path": str(path), "format": slide.format, "image": slide.image}
    if path.is_file():
        sig["files"] = [_stat(path)]
    elif path.is_dir():
        meta = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
        files = [p for p in path.rglob("*") if p.name in meta or p.parent == path]
        sig["files"] = sorted([str(p.relative_to(path)), *_stat(p)[1:]] for p in files if p.is_file())
    if slide.image and Path(slide.image).is_file():
        sig["image_file"] = _stat(Path(slide.image))
    return sig


def output_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of a slide's output ``.zarr`` (None when there is no complete output)."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        return None
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    except Exception:
        return None
    record = attrs.get(Keys.ATTRS, {}).get(COHORT_ATTR)
    return record if isinstance(record, dict) else None


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on."""
    return model_versions("anndata", "dask", "distributed")


# --------------------------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Task:
    """One slide's work: a picklable description run by :func:`run_task` (in this process or on a Dask worker)."""

    command: str
    slide: Slide
    out: str
    params: dict[str, Any]
    fingerprint: str
    hest_root: str | None = None
    upstream: str | None = None
    model: str | None = None
    threads: int | None = None


#: Per-process caches of encoders and models (a worker runs many slides with the same ones).
_CACHE: dict[Any, Any] = {}


def cached(key: Any, make: Callable[[], Any]) -> Any:
    """A per-process cache of expensive objects (encoders, models)."""
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def run_task(task: Task, step: Callable[[Task, SpatialData], None]) -> dict[str, Any]:
    """Run one slide: read it (and its upstream output), apply ``step``, write ``DIR/<slide_id>.zarr`` atomically.

    Never raises: a failure is returned as ``{"status": "failed", "error": ..., "traceback": ...}``.
    """
    t0 = time.perf_counter()
    result = {"slide_id": task.slide.slide_id, "status": "done", "error": "", "traceback": "", "seconds": 0.0}
    try:
        if task.threads:
            import torch

            torch.set_num_threads(int(task.threads))
        sdata = load_slide(task.slide, task.hest_root, image_key=task.params.get("image_key"))
        if task.upstream is not None:
            sdata = merge_outputs(sdata, task.upstream)
        step(task, sdata)
        record = {
            "command": task.command,
            "fingerprint": task.fingerprint,
            "params": task.params,
            "source": dataclasses.asdict(task.slide),
            "hest_root": task.hest_root,
            "upstream": task.upstream,
            "model": task.model,
        }
        write_sdata_atomic(outputs_only(sdata, record), Path(task.out) / f"{task.slide.slide_id}.zarr", overwrite=True)
    except Exception as err:
        result.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


# --------------------------------------------------------------------------------------------------------------------
# running a cohort
# --------------------------------------------------------------------------------------------------------------------
def out_problem(out: str | os.PathLike, option: str = "--out") -> str | None:
    """Why the folder ``out`` cannot be used or created; None when it can.

    It is a file, a path component above it is a file, or the nearest existing folder above it is not writable.
    """
    out = Path(out)
    if out.exists():
        return None if out.is_dir() else f"{option} {out} is a file, not a folder."
    for parent in out.parents:
        if not (parent.exists() or parent.is_symlink()):
            continue
        if not parent.is_dir():
            return f"{option} {out}: {parent} is a file, not a folder."
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{option} {out}: the folder {parent} is not writable."
        return None
    return None


def prepare_out(out: str | os.PathLike, option: str = "--out") -> Path:
    """The output folder (not created here); a :class:`UserError` when it cannot be one (:func:`out_problem`)."""
    problem = out_problem(out, option)
    if problem is not None:
        raise UserError(problem)
    return Path(out)


def start_logging(out: Path, quiet: bool) -> logging.Handler:
    """Log the "spade_sc" logger to ``out/spade-sc.log`` (always) and to the console (unless ``quiet``).

    Dask's warnings (workers lost or restarted, for example) go to the log file too; :func:`dask_logs` keeps them off
    the console with ``quiet``.
    """
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for h in logging.getLogger().handlers:
        if not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger(DASK_LOGGER).addHandler(handler)
    return handler


def stop_logging(handler: logging.Handler) -> None:
    """Close the log file of :func:`start_logging`."""
    logger.removeHandler(handler)
    logging.getLogger(DASK_LOGGER).removeHandler(handler)
    handler.close()


@contextlib.contextmanager
def dask_logs(quiet: bool) -> Iterator[None]:
    """Dask's own log lines during a run: warnings and errors only, and none on the console with ``quiet``.

    ``distributed`` announces every cluster start, worker and connection at INFO level; those are dropped. With
    ``quiet`` its records stop at its own logger (the run's log file, attached by :func:`start_logging`, still gets
    them); the worker processes of a ``LocalCluster`` are silenced by :func:`dask_client`. Restored afterwards.
    """
    import distributed  # noqa: F401  (its import configures its loggers: ours comes after)

    lg = logging.getLogger(DASK_LOGGER)
    level, propagate, handlers = lg.level, lg.propagate, list(lg.handlers)
    lg.setLevel(logging.WARNING)
    if quiet:
        lg.propagate = False
        lg.addHandler(logging.NullHandler())  # never Python's last-resort handler on stderr
    try:
        yield
    finally:
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:] = handlers


def dask_client(workers: int | None, scheduler: str | None, *, timeout: float = 5.0, quiet: bool = False) -> Any:
    """A ``distributed.Client``: on a new ``LocalCluster`` of ``workers`` processes, or at ``scheduler``.

    The ``LocalCluster`` has no dashboard; its worker processes log errors only (nothing with ``quiet``).
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as err:
            msg = (
                f"Cannot reach the Dask scheduler at {scheduler} within {timeout:.0f} s ({type(err).__name__}: {err})."
            )
            raise UserError(msg) from None
    cluster = LocalCluster(
        n_workers=int(workers),
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.CRITICAL + 1 if quiet else logging.ERROR,
    )
    client = Client(cluster)
    client._spade_local_cluster = cluster
    return client


def execute(
    tasks: Sequence[Task],
    step: Callable[[Task, SpatialData], None],
    *,
    client: Any = None,
    stop_on_error: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the tasks here (serially, ``client=None``) or one per slide on a Dask cluster; results as they complete.

    The client (and a ``LocalCluster`` it made) is closed at the end.
    """
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(tasks), desc=tasks[0].command if tasks else "", unit="slide", disable=not progress)
    if client is None:
        for task in tasks:
            results.append(_report(run_task(task, step), bar))
            if stop_on_error and results[-1]["status"] == "failed":
                break
        bar.close()
        return results
    try:
        from distributed import as_completed

        futures = {
            client.submit(run_task, t, step, key=f"spade-sc-{t.command}-{t.slide.slide_id}-{t.fingerprint[:12]}"): t
            for t in tasks
        }
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as err:
                result = {"slide_id": futures[future].slide.slide_id, "status": "failed", "seconds": 0.0}
                result.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            results.append(_report(result, bar))
            if stop_on_error and result["status"] == "failed":
                client.cancel(list(futures))
                break
    finally:
        bar.close()
        close_client(client)
    return results


def close_client(client: Any) -> None:
    """Close a client of :func:`dask_client` and the ``LocalCluster`` it started (never a cluster it joined)."""
    cluster = getattr(client, "_spade_local_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def _report(result: dict[str, Any], bar: Any) -> dict[str, Any]:
    bar.update(1)
    if result["status"] == "failed":
        logger.warning("slide %s failed: %s", result["slide_id"], result["error"])
        logger.debug(result.get("traceback", ""))
    else:
        logger.info("slide %s done in %.1f s", result["slide_id"], result["seconds"])
    return result


def plan(
    command: str,
    slides: Sequence[Slide],
    out: Path,
    params: Mapping[str, Any],
    *,
    fingerprinted: Mapping[str, Any],
    hest_root: str | None,
    upstream: str | None,
    model: str | None,
    model_fingerprint: str | None,
    threads: int | None,
    overwrite: bool,
) -> tuple[list[Task], list[dict[str, Any]]]:
    """The tasks to run, and the records of the slides skipped (complete, same fingerprint) or failed already."""
    tasks, records = [], []
    for slide in slides:
        why = missing_input(slide, hest_root)
        up = None
        if why is None and upstream is not None:
            up = str(Path(upstream) / f"{slide.slide_id}.zarr")
            if output_record(up) is None:
                up = None  # no earlier output for this slide: everything is computed from the input
        upstream_print = (output_record(up) or {}).get("fingerprint") if up else None
        fingerprint = digest(
            {
                "command": command,
                "params": fingerprinted,
                "input": input_signature(slide, hest_root) if why is None else None,
                "upstream": upstream_print,
                "model": model_fingerprint,
            }
        )
        if why is not None:
            records.append({"slide_id": slide.slide_id, "status": "failed", "error": why, "seconds": 0.0})
            logger.warning("slide %s failed: %s", slide.slide_id, why)
            continue
        done = output_record(out / f"{slide.slide_id}.zarr")
        if not overwrite and done is not None and done.get("fingerprint") == fingerprint:
            records.append({"slide_id": slide.slide_id, "status": "skipped", "error": "", "seconds": 0.0})
            continue
        task = Task(command, slide, str(out), dict(params), fingerprint, hest_root, up, model, threads)
        tasks.append(task)
    return tasks, records


def write_records(
    out: Path,
    command: str,
    argv: Sequence[str],
    params: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    t0: float,
) -> dict[str, int]:
    """Write ``failures.csv`` and ``run.json`` (atomically); the counts of done / skipped / failed slides."""
    failed = [r for r in records if r["status"] == "failed"]
    frame = pd.DataFrame(
        [{"slide_id": r["slide_id"], "error": r["error"]} for r in failed], columns=["slide_id", "error"]
    )
    write_text_atomic(out / FAILURES_FILE, frame.to_csv(index=False))
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    run = {
        "command": command,
        "argv": list(argv),
        "params": json_safe(dict(params)),
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 3),
        "counts": counts,
        "slides": {r["slide_id"]: {k: r.get(k) for k in ("status", "seconds", "error")} for r in records},
    }
    write_text_atomic(out / RUN_FILE, json.dumps(json_safe(run), indent=1, default=str))
    return counts


def summary_line(command: str, counts: Mapping[str, int], seconds: float, out: Path) -> str:
    """The line a run ends with."""
    return (
        f"spade-sc {command}: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
        f"in {seconds:.1f} s -> {out}"
    )


def run_cohort(
    command: str,
    args: Any,
    step: Callable[[Task, SpatialData], None],
    params: Mapping[str, Any],
    *,
    model: str | None = None,
    model_fingerprint: str | None = None,
    fingerprinted: Mapping[str, Any] | None = None,
    after: Callable[[Path, list[Slide], pd.DataFrame, list[dict[str, Any]]], None] | None = None,
) -> int:
    """Run a per-slide command over a manifest: plan, execute, record, summarise. Returns the exit code.

    ``args`` holds the common options (``manifest``, ``out``, ``hest_root``, ``workers``, ``scheduler``,
    ``on_error``, ``overwrite``, ``quiet``, ``threads``, ``argv``); ``fingerprinted`` are the parameters that
    change the results (default all; not e.g. the batch size); ``after`` runs once all tasks are done (e.g. the
    cohort table of ``slides``).
    """
    t0 = time.perf_counter()
    slides, labels = read_manifest(args.manifest, hest_root=args.hest_root)
    out = prepare_out(args.out)
    upstream = getattr(args, "features", None)
    if upstream is not None and not Path(upstream).is_dir():
        msg = f"--features {upstream} is not a folder."
        raise UserError(msg)
    dask = args.workers is not None or args.scheduler is not None
    with dask_logs(args.quiet) if dask else contextlib.nullcontext():
        client = dask_client(args.workers, args.scheduler, quiet=args.quiet) if dask else None
        handler = start_logging(out, args.quiet)
        try:
            for stale in remove_stale(out):
                logger.info("removed the stale temporary %s", stale.name)
            logger.info("spade-sc %s: %d slides -> %s", command, len(slides), out)
            tasks, records = plan(
                command,
                slides,
                out,
                params,
                fingerprinted=params if fingerprinted is None else fingerprinted,
                hest_root=None if args.hest_root is None else str(args.hest_root),
                upstream=None if upstream is None else str(upstream),
                model=model,
                model_fingerprint=model_fingerprint,
                threads=args.threads,
                overwrite=args.overwrite,
            )
            stop = args.on_error == "stop"
            if not (stop and any(r["status"] == "failed" for r in records)):
                records += execute(tasks, step, client=client, stop_on_error=stop, progress=not args.quiet)
                client = None  # execute closed it
            if after is not None:
                after(out, slides, labels, records)
            counts = write_records(out, command, args.argv, params, records, t0)
            line = summary_line(command, counts, time.perf_counter() - t0, out)
            logger.info(line)
            if args.quiet:
                print(line)
            return 1 if counts["failed"] else 0
        finally:
            if client is not None:
                close_client(client)
            stop_logging(handler)
