"""The subcommands of ``spade-sc`` over a manifest: per-slide steps, and the cohort-level fit and evaluate.

Per-slide steps (features, embed, slides) run through :func:`spade_sc._cohort.run_cohort`; ``mil`` lives in
:mod:`spade_sc._mil_command`. Argument parsing lives in :mod:`spade_sc.cli`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from . import pp, tl
from ._atomic import atomic_path, remove_stale, write_text_atomic
from ._cohort import (
    FAILURES_FILE,
    LOG_FILE,
    RUN_FILE,
    Slide,
    Task,
    UserError,
    cached,
    digest,
    input_signature,
    load_slide,
    merge_outputs,
    missing_input,
    output_record,
    prepare_out,
    read_manifest,
    run_cohort,
    start_logging,
    stop_logging,
    summary_line,
    versions,
)
from ._constants import EVALUATION_TASKS, REPRESENTATIONS, Keys
from ._sdata import resolve_key
from ._validation import json_safe
from .model._files import CONFIG_FILE, WEIGHTS_FILE, check_model_folder

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: File of ``spade-sc slides``: one row per slide.
SLIDES_FILE = "slides.h5ad"
#: Parameters of the per-slide commands that change the speed, not the results: left out of the fingerprints.
_SPEED_ONLY = ("batch_size", "device", "tune_malloc")


# --------------------------------------------------------------------------------------------------------------------
# per-slide steps (module-level functions: Dask pickles them by name)
# --------------------------------------------------------------------------------------------------------------------
def _encoder(name: str, weights: str | None, device: str = "auto") -> Any:
    from .encoders import get_encoder

    return cached(("encoder", name, weights, device), lambda: get_encoder(name, weights=weights, device=device))


def _model(path: str) -> Any:
    from .model import SpadeModel

    return cached(("model", path), lambda: SpadeModel.load(path))


def _tiles_of(sdata: SpatialData, p: Mapping[str, Any]) -> tuple[str, str, str]:
    """(image, tiles shapes, tiles table) of a slide, tiling its tissue first when it has no tiles yet."""
    image_key = resolve_key(sdata, "images", p.get("image_key"))
    shapes_key, table_key = Keys.tiles(image_key), Keys.tiles_table(image_key)
    if shapes_key not in sdata.shapes or table_key not in sdata.tables:
        pp.tile_tissue(sdata, image_key=image_key, mpp=p["mpp"], tile_size=p["patch_size"], overwrite=True)
    return image_key, shapes_key, table_key


def features_step(task: Task, sdata: SpatialData) -> None:
    """``spade-sc features``: spot features, or tissue tiles and their features."""
    p = task.params
    kwargs = {
        "encoder": _encoder(p["encoder"], p["encoder_weights"], p["device"]),
        "mpp": p["mpp"],
        "patch_size": p["patch_size"],
        "batch_size": p["batch_size"],
        "image_key": p.get("image_key"),
        "overwrite": True,
        "progress": False,
        "tune_malloc": p.get("tune_malloc"),
        "views": p.get("views", 1),
    }
    if p["tiles"]:
        kwargs["image_key"], shapes_key, _ = _tiles_of(sdata, p)
        pp.image_features(sdata, shapes_key=shapes_key, **kwargs)
    else:
        pp.image_features(sdata, **kwargs)


def embed_step(task: Task, sdata: SpatialData) -> None:
    """``spade-sc embed``: the SPADE embedding of the spots (or tiles) of a slide."""
    p = task.params
    model = _model(task.model)
    feature_kwargs = {"mpp": p["mpp"], "patch_size": p["patch_size"], "batch_size": p["batch_size"]}
    feature_kwargs.update(device=p["device"], tune_malloc=p.get("tune_malloc"), views=p.get("views", 1))
    if p["tiles"]:
        image_key, shapes_key, table_key = _tiles_of(sdata, p)
        feature_kwargs["image_key"] = image_key
        tl.embed(
            sdata, model, table_key=table_key, shapes_key=shapes_key, progress=False, feature_kwargs=feature_kwargs
        )
    else:
        if p.get("image_key"):
            feature_kwargs["image_key"] = p["image_key"]
        tl.embed(sdata, model, progress=False, feature_kwargs=feature_kwargs)


def slides_step(task: Task, sdata: SpatialData) -> None:
    """``spade-sc slides``: tiles, tile embeddings and the slide's row of the slide table."""
    p = task.params
    tl.slide_embeddings(
        {task.slide.slide_id: sdata},
        _model(task.model),
        image_key=p.get("image_key"),
        tile_kwargs={"mpp": p["mpp"], "tile_size": p["patch_size"]},
        feature_kwargs={
            "batch_size": p["batch_size"],
            "device": p["device"],
            "tune_malloc": p.get("tune_malloc"),
            "views": p.get("views", 1),
        },
        progress=False,
    )


# --------------------------------------------------------------------------------------------------------------------
# per-slide commands
# --------------------------------------------------------------------------------------------------------------------
def _views(args: Any, tiles: bool) -> int:
    """``image_features(views=...)``: ``--views``, else 8 for spots (as ``tl.fit``) and 1 for tiles (whole slides)."""
    return int(args.views) if getattr(args, "views", None) is not None else (1 if tiles else 8)


def _geometry(args: Any) -> dict[str, Any]:
    return {"mpp": float(args.mpp), "patch_size": int(args.patch_size), "image_key": args.image_key}


def _tune_malloc(args: Any) -> bool | None:
    """``image_features(tune_malloc=...)``: False with ``--no-tune-malloc``, else None (the function's default)."""
    return False if getattr(args, "no_tune_malloc", False) else None


def features(args: Any) -> int:
    """``spade-sc features``."""
    params = {"encoder": args.encoder, "encoder_weights": _weights(args), "tiles": bool(args.tiles), **_geometry(args)}
    params["views"] = _views(args, bool(args.tiles))
    params.update(batch_size=int(args.batch_size), device=args.device, tune_malloc=_tune_malloc(args))
    fingerprinted = {k: v for k, v in params.items() if k not in _SPEED_ONLY}
    return run_cohort("features", args, features_step, params, fingerprinted=fingerprinted)


def _weights(args: Any) -> str | None:
    """The absolute path of ``--encoder-weights`` (checked), or None."""
    if args.encoder_weights is None:
        return None
    path = Path(args.encoder_weights)
    if not path.is_file():
        msg = f"--encoder-weights {path} is not a file."
        raise UserError(msg)
    return str(path.resolve())


def check_model(path: str | Path, option: str = "--model") -> tuple[str, str]:
    """(folder, fingerprint) of a SPADE model folder, loaded once to check it; a :class:`UserError` otherwise."""
    from .model import SpadeModel

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        msg = f"{option} {path} is not a model folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE})."
        raise UserError(msg)
    try:
        model = SpadeModel.load(path)
    except (ValueError, KeyError, OSError) as err:
        msg = f"{option} {path} cannot be read as a SpadeModel: {err}"
        raise UserError(msg) from None
    return str(path.resolve()), model.fingerprint()


def embed(args: Any) -> int:
    """``spade-sc embed``."""
    model, fingerprint = check_model(args.model)
    params = {"tiles": bool(args.tiles), **_geometry(args), "batch_size": int(args.batch_size), "device": args.device}
    params["views"] = _views(args, bool(args.tiles))
    params["tune_malloc"] = _tune_malloc(args)
    fingerprinted = {k: v for k, v in params.items() if k not in _SPEED_ONLY}
    return run_cohort(
        "embed", args, embed_step, params, model=model, model_fingerprint=fingerprint, fingerprinted=fingerprinted
    )


def slides(args: Any) -> int:
    """``spade-sc slides``."""
    model, fingerprint = check_model(args.model)
    params = {**_geometry(args), "batch_size": int(args.batch_size), "device": args.device}
    params["views"] = _views(args, True)
    params["tune_malloc"] = _tune_malloc(args)
    fingerprinted = {k: v for k, v in params.items() if k not in _SPEED_ONLY}
    return run_cohort(
        "slides",
        args,
        slides_step,
        params,
        model=model,
        model_fingerprint=fingerprint,
        fingerprinted=fingerprinted,
        after=_slide_table,
    )


def _labels_typed(labels: pd.DataFrame) -> pd.DataFrame:
    """Manifest labels with numeric columns as numbers (a CSV is read as text)."""
    out = labels.copy()
    for col in out.columns:
        values = out[col].replace("", np.nan)
        numbers = pd.to_numeric(values, errors="coerce")
        out[col] = numbers if numbers.notna().sum() == values.notna().sum() else values
    return out


def _slide_table(out: Path, slides_: list[Slide], labels: pd.DataFrame, records: list[dict[str, Any]]) -> None:
    """``DIR/slides.h5ad``: the rows of every finished slide, with the manifest's labels (written atomically)."""
    import anndata as ad
    import spatialdata as sd

    ok = {r["slide_id"] for r in records if r["status"] in ("done", "skipped")}
    rows = []
    for slide in slides_:
        if slide.slide_id in ok:
            part = sd.read_zarr(out / f"{slide.slide_id}.zarr", selection=("tables",))
            rows.append(part.tables[Keys.SLIDES])
    if not rows:
        return
    adata = ad.concat(rows, merge="same", uns_merge="first")
    labels = _labels_typed(labels).reindex(adata.obs_names)
    for col in labels.columns:
        adata.obs[col] = labels[col].to_numpy()
    adata.uns["spade_sc_cohort"] = {"manifest_columns": list(labels.columns), "slides_dir": str(out)}
    with atomic_path(out / SLIDES_FILE, overwrite=True) as tmp:
        adata.write_h5ad(tmp)


# --------------------------------------------------------------------------------------------------------------------
# cohort-level commands
# --------------------------------------------------------------------------------------------------------------------
def _load_cohort(
    slides_: Sequence[Slide], args: Any, *, progress: bool
) -> tuple[dict[str, SpatialData], list[dict[str, Any]], dict[str, Any]]:
    """Every readable slide (with its features from ``--features``), the failures, and the input signatures."""
    from tqdm.auto import tqdm

    cohort, records, inputs = {}, [], {}
    for slide in tqdm(slides_, desc="reading slides", unit="slide", disable=not progress):
        why = missing_input(slide, args.hest_root)
        if why is None:
            try:
                sdata = load_slide(slide, args.hest_root)
                upstream = None if args.features is None else Path(args.features) / f"{slide.slide_id}.zarr"
                up = output_record(upstream) if upstream is not None else None
                if up is not None:
                    sdata = merge_outputs(sdata, upstream)
                cohort[slide.slide_id] = sdata
                inputs[slide.slide_id] = {
                    "input": input_signature(slide, args.hest_root),
                    "upstream": (up or {}).get("fingerprint"),
                }
                continue
            except Exception as err:
                why = f"{type(err).__name__}: {err}"
        records.append({"slide_id": slide.slide_id, "status": "failed", "error": why, "seconds": 0.0})
        logger.warning("slide %s failed: %s", slide.slide_id, why)
    return cohort, records, inputs


def _run_texts(
    command: str, args: Any, params: Mapping[str, Any], records: Sequence[Mapping[str, Any]], t0: float, **extra: Any
) -> tuple[str, str, dict[str, int]]:
    """(run.json text, failures.csv text, counts)."""
    failed = [r for r in records if r["status"] == "failed"]
    failures = pd.DataFrame(
        [{"slide_id": r["slide_id"], "error": r["error"]} for r in failed], columns=["slide_id", "error"]
    )
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    run = {
        "command": command,
        "argv": list(args.argv),
        "params": json_safe(dict(params)),
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 3),
        "counts": counts,
        "slides": {r["slide_id"]: {k: r.get(k) for k in ("status", "seconds", "error")} for r in records},
        **extra,
    }
    return json.dumps(json_safe(run), indent=1, default=str), failures.to_csv(index=False), counts


def _finished(out: Path, fingerprint: str, files: Sequence[str]) -> bool:
    """Whether ``out`` holds a complete earlier run with this fingerprint."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return run.get("fingerprint") == fingerprint and all((out / f).exists() for f in files)


def _trainer_kwargs(args: Any) -> dict[str, Any]:
    kwargs = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes}
    kwargs["strategy"] = args.strategy
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if isinstance(kwargs.get("devices"), str) and kwargs["devices"].isdigit():
        kwargs["devices"] = int(kwargs["devices"])
    return kwargs


def fit(args: Any) -> int:
    """``spade-sc fit``: train SPADE on the manifest's slides; the model folder holds its run records."""
    t0 = time.perf_counter()
    slides_, _ = read_manifest(args.manifest, hest_root=args.hest_root)
    out = prepare_out(args.out)
    if out.exists():
        try:
            check_model_folder(out)
        except FileExistsError as err:
            raise UserError(str(err)) from None
    if args.features is not None and not Path(args.features).is_dir():
        msg = f"--features {args.features} is not a folder."
        raise UserError(msg)
    if args.checkpoint_dir is not None:
        prepare_out(args.checkpoint_dir, "--checkpoint-dir")
    params = {
        "features_key": args.features_key,
        "encoder": args.encoder,
        "encoder_weights": _weights(args),
        "mpp": float(args.mpp),
        "patch_size": int(args.patch_size),
        "n_experts": args.n_experts if args.n_experts == "auto" else int(args.n_experts),
        "epochs": int(args.epochs),
        "batch_size": int(args.batch_size),
        "lr": float(args.lr),
        "seed": int(args.seed),
        "tissue_key": args.tissue_key,
    }
    handler = start_logging(out, args.quiet)
    try:
        remove_stale(out.parent)
        cohort, records, inputs = _load_cohort(slides_, args, progress=not args.quiet)
        fingerprint = digest({"command": "fit", "params": params, "inputs": inputs, "failed": records})
        if not args.overwrite and _finished(out, fingerprint, (CONFIG_FILE, WEIGHTS_FILE)):
            line = f"spade-sc fit: {out} is complete with the same parameters and inputs; skipped."
            logger.info(line)
            if args.quiet:
                print(line)
            return 0
        if not cohort:
            msg = "No slide of the manifest could be read; see failures above."
            raise UserError(msg)
        model = _train(cohort, params, args)
        records += [{"slide_id": s, "status": "done", "error": "", "seconds": 0.0} for s in cohort]
        run_text, failures_text, counts = _run_texts("fit", args, params, records, t0, fingerprint=fingerprint)
        line = summary_line("fit", counts, time.perf_counter() - t0, out)
        logger.info(line)
    finally:
        stop_logging(handler)
    log_text = (out / LOG_FILE).read_text() if (out / LOG_FILE).exists() else ""
    extra = {RUN_FILE: run_text, FAILURES_FILE: failures_text, LOG_FILE: log_text}
    from .model._files import write_model_folder

    write_model_folder(out, model.state_tensors(), model.config(), overwrite=True, extra_files=extra)
    if args.quiet:
        print(line)
    return 1 if counts["failed"] else 0


def _train(cohort: Mapping[str, SpatialData], params: Mapping[str, Any], args: Any) -> Any:
    """``tl.fit`` with the command's settings; its argument and checkpoint errors become user errors."""
    try:
        return tl.fit(
            cohort,
            features_key=params["features_key"],
            encoder=_encoder(params["encoder"], params["encoder_weights"]),
            n_experts=params["n_experts"],
            tissue_key=params["tissue_key"],
            max_epochs=params["epochs"],
            batch_size=params["batch_size"],
            lr=params["lr"],
            seed=params["seed"],
            trainer_kwargs=_trainer_kwargs(args),
            feature_kwargs={
                "mpp": params["mpp"],
                "patch_size": params["patch_size"],
                "tune_malloc": _tune_malloc(args),
            },
            progress=not args.quiet,
            checkpoint_dir=args.checkpoint_dir,
            resume=bool(args.resume),
        )
    except (ValueError, FileExistsError) as err:
        raise UserError(str(err).splitlines()[0]) from None


def evaluate(args: Any) -> int:
    """``spade-sc evaluate``: the ``tl.evaluate`` table (CSV) and its protocol (JSON)."""
    t0 = time.perf_counter()
    slides_, _ = read_manifest(args.manifest, hest_root=args.hest_root)
    out = prepare_out(args.out)
    params = {
        "features_key": args.features_key,
        "encoder": args.encoder,
        "encoder_weights": _weights(args),
        "label_key": args.label_key,
        "epochs": int(args.epochs),
        "n_experts": args.n_experts if args.n_experts == "auto" else int(args.n_experts),
        "seed": int(args.seed),
        "n_draws": int(args.n_draws),
        "representations": _names(args.representations, REPRESENTATIONS),
        "tasks": _names(args.tasks, EVALUATION_TASKS),
    }
    files = ("evaluation.csv", "per_gene.csv", "summary.csv", "protocol.json")
    handler = start_logging(out, args.quiet)
    try:
        remove_stale(out)
        cohort, records, inputs = _load_cohort(slides_, args, progress=not args.quiet)
        fingerprint = digest({"command": "evaluate", "params": params, "inputs": inputs, "failed": records})
        if not args.overwrite and _finished(out, fingerprint, files):
            print(f"spade-sc evaluate: {out} is complete with the same parameters and inputs; skipped.")
            return 0
        if len(cohort) < 2:
            msg = f"spade-sc evaluate needs at least two readable slides; {len(cohort)} could be read."
            raise UserError(msg)
        features_key = _ensure_features(cohort, args, params)
        result = _evaluate(cohort, features_key, params, args)
        _write_evaluation(out, result)
        records += [{"slide_id": s, "status": "done", "error": "", "seconds": 0.0} for s in cohort]
        run_text, failures_text, counts = _run_texts("evaluate", args, params, records, t0, fingerprint=fingerprint)
        write_text_atomic(out / FAILURES_FILE, failures_text)
        write_text_atomic(out / RUN_FILE, run_text)
        print(summary_line("evaluate", counts, time.perf_counter() - t0, out))
        return 1 if counts["failed"] else 0
    finally:
        stop_logging(handler)


def _evaluate(cohort: Mapping[str, SpatialData], features_key: str, params: Mapping[str, Any], args: Any) -> Any:
    """``tl.evaluate`` with the command's settings; its argument errors become user errors."""
    try:
        return tl.evaluate(
            cohort,
            features_key=features_key,
            label_key=args.label_key,
            fit_kwargs={"max_epochs": params["epochs"], "n_experts": params["n_experts"]},
            n_draws=params["n_draws"],
            representations=params["representations"],
            tasks=params["tasks"],
            seed=params["seed"],
            progress=not args.quiet,
        )
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None


def _write_evaluation(out: Path, result: Any) -> None:
    """The scores, per-gene scores, summary (CSV) and protocol (JSON), each written atomically."""
    write_text_atomic(out / "evaluation.csv", result.table.to_csv(index=False))
    write_text_atomic(out / "per_gene.csv", result.per_gene.to_csv(index=False))
    write_text_atomic(out / "summary.csv", result.summary().to_csv())
    write_text_atomic(out / "protocol.json", json.dumps(json_safe(result.protocol), indent=1, default=str))


def _names(text: str | None, default: Sequence[str]) -> list[str]:
    """A comma-separated option as a list (the default when not given)."""
    if text is None:
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def _ensure_features(cohort: Mapping[str, SpatialData], args: Any, params: Mapping[str, Any]) -> str:
    """The features key of the evaluation, after computing the features of the slides that lack them."""
    key = params["features_key"]
    enc = None
    if key is None:
        enc = _encoder(params["encoder"], params["encoder_weights"])
        key = Keys.features(enc.name)
    for name, sdata in cohort.items():
        table = sdata.tables[resolve_key(sdata, "tables", None)]
        if key not in table.obsm:
            enc = enc or _encoder(params["encoder"], params["encoder_weights"])
            logger.info("evaluate: computing %s features of slide %s", enc.name, name)
            pp.image_features(sdata, encoder=enc, key_added=key, progress=False, tune_malloc=_tune_malloc(args))
    return key
