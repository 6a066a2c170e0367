"""``spade-sc`` over a manifest: every subcommand end to end, kill and rerun, 2 Dask workers, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spade_sc as sp
from spade_sc.cli import main

SUBCOMMANDS = ("demo", "features", "fit", "embed", "slides", "mil", "evaluate")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small synthetic slides as .zarr, a manifest (plus one slide whose path does not exist), test weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cohort")
    slides = sp.datasets.synthetic(n_slides=4, n_spots=60, image_size=512, seed=0)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, sdata) in enumerate(slides.items()):
            sdata.write(root / f"{name}.zarr")
            rows.append({"slide_id": name, "path": f"{name}.zarr", "group": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(root / "good.csv", index=False)
    rows.append({"slide_id": "broken", "path": "missing.zarr", "group": "a"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    torch.manual_seed(0)  # a tiny timm encoder with fixed weights: fast and the same in every process
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "encoder.safetensors"))
    return root


def _features_args(cohort: Path, out: Path, *extra: str) -> list[str]:
    weights = str(cohort / "encoder.safetensors")
    encoder = ["--encoder", "test_resnet", "--encoder-weights", weights, "--threads", "1", "--quiet"]
    return ["features", str(cohort / "manifest.csv"), "--out", str(out), *encoder, *extra]


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """An uninterrupted serial ``spade-sc features`` run."""
    out = tmp_path_factory.mktemp("reference") / "features"
    assert main(_features_args(cohort, out)) == 1  # the broken slide fails, the others finish
    return out


def _features(folder: Path) -> dict[str, np.ndarray]:
    import spatialdata as sd

    out = {}
    for path in sorted(folder.glob("*.zarr")):
        out[path.stem] = np.asarray(sd.read_zarr(path).tables["table"].obsm["X_test_resnet"])
    return out


def _assert_same(a: Path, b: Path) -> None:
    fa, fb = _features(a), _features(b)
    assert sorted(fa) == sorted(fb) == ["slide0", "slide1", "slide2", "slide3"]
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name])


def test_help_of_every_subcommand(capsys):
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: spade-sc {command}" in capsys.readouterr().out


def test_features_records_failures_and_skips_on_rerun(cohort, reference, capsys):
    failures = pd.read_csv(reference / "failures.csv")
    assert list(failures["slide_id"]) == ["broken"]
    assert "does not exist" in failures["error"].iloc[0]
    run = json.loads((reference / "run.json").read_text())
    assert run["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    assert run["command"] == "features" and "versions" in run and run["slides"]["slide0"]["status"] == "done"
    assert (reference / "spade-sc.log").is_file()
    capsys.readouterr()
    assert main(_features_args(cohort, reference)) == 1  # same parameters: every finished slide is skipped
    assert "0 done, 4 skipped, 1 failed" in capsys.readouterr().out
    assert main(_features_args(cohort, reference, "--on-error", "stop")) == 1  # stops at the missing input


def test_kill_then_rerun_equals_the_uninterrupted_run(cohort, reference, tmp_path):
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "spade_sc.cli", *_features_args(cohort, out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("slide*.zarr")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, after the first slide is done
    proc.wait()
    finished = sorted(p.stem for p in out.glob("slide*.zarr"))
    assert 1 <= len(finished) < 4
    partial = _features(out)  # every finished slide is readable (no half-written output under the final name)
    assert sorted(partial) == finished
    assert main(_features_args(cohort, out)) == 1
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped"] == len(finished) and run["counts"]["done"] == 4 - len(finished)
    assert not [p for p in out.iterdir() if ".spade-tmp-" in p.name]  # stale temporaries removed
    _assert_same(out, reference)


def test_two_dask_workers_equal_the_serial_run(cohort, reference, tmp_path, capfd):
    out = tmp_path / "features"
    capfd.readouterr()
    assert main(_features_args(cohort, out, "--workers", "2")) == 1
    # --quiet: the summary line alone, nothing from the LocalCluster (scheduler, nannies, worker processes)
    stdout, stderr = capfd.readouterr()
    assert stdout.strip().startswith("spade-sc features: 4 done, 0 skipped, 1 failed") and len(stdout.splitlines()) == 1
    assert not stderr.strip(), stderr
    assert json.loads((out / "run.json").read_text())["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    _assert_same(out, reference)


def test_quiet_keeps_dask_logs_off_the_console(tmp_path):
    """What a --workers / --scheduler run does with Dask's loggers (scheduler, nannies and client in this process)."""
    import io
    import logging

    from spade_sc._cohort import dask_logs, start_logging, stop_logging

    console = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(console)
    try:
        with dask_logs(quiet=True):
            handler = start_logging(tmp_path, quiet=True)
            logging.getLogger("distributed.scheduler").info("State start")
            logging.getLogger("distributed.nanny").warning("Worker process still alive after 4.0 seconds, killing")
            logging.getLogger("distributed.nanny").error("Worker exceeded 95% memory budget")
            stop_logging(handler)
        with dask_logs(quiet=False):
            logging.getLogger("distributed.scheduler").info("Scheduler at: tcp://127.0.0.1:1")
            logging.getLogger("distributed.nanny").warning("Restarting worker")
        assert logging.getLogger("distributed").propagate  # restored
    finally:
        root.removeHandler(console)
    assert console.stream.getvalue() == "Restarting worker\n"  # without --quiet: Dask's warnings, not its INFO lines
    log = (tmp_path / "spade-sc.log").read_text()  # with --quiet: its warnings in the run's log file only
    assert "still alive" in log and "memory budget" in log and "State start" not in log


def _bad(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("slide_id,path\n")
    pd.DataFrame({"id": ["a"], "path": ["x.zarr"]}).to_csv(tmp_path / "noid.csv", index=False)
    pd.DataFrame({"slide_id": ["a", "a"], "path": ["x.zarr", "y.zarr"]}).to_csv(tmp_path / "dup.csv", index=False)
    good = str(cohort / "good.csv")
    assert "does not exist" in _bad(["features", str(tmp_path / "none.csv"), "--out", str(out)], capsys)
    assert "is empty" in _bad(["features", str(tmp_path / "empty.csv"), "--out", str(out)], capsys)
    assert "lists no slide" in _bad(["features", str(tmp_path / "header.csv"), "--out", str(out)], capsys)
    assert "slide_id" in _bad(["features", str(tmp_path / "noid.csv"), "--out", str(out)], capsys)
    assert "['a']" in _bad(["features", str(tmp_path / "dup.csv"), "--out", str(out)], capsys)
    (tmp_path / "outs").mkdir()  # a Space Ranger folder with two candidate full-resolution images
    for name in ("he.tif", "he_2.jpg", "tissue_hires_image.png"):
        (tmp_path / "outs" / name).write_text("")
    pd.DataFrame({"slide_id": ["v"], "path": ["outs"]}).to_csv(tmp_path / "two.csv", index=False)
    err = _bad(["features", str(tmp_path / "two.csv"), "--out", str(out)], capsys)
    assert "'v'" in err and "['he.tif', 'he_2.jpg']" in err and "image column" in err
    assert "--workers" in _bad(["features", good, "--out", str(out), "--workers", "0"], capsys)
    assert "not a model folder" in _bad(["embed", good, "--model", str(tmp_path), "--out", str(out)], capsys)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in _bad(["features", good, "--out", str(tmp_path / "file")], capsys)
    t0 = time.time()
    err = _bad(["features", good, "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert "tcp://127.0.0.1:9" in err and time.time() - t0 < 30
    assert not out.exists()


class _Stop(Exception):
    """Raised by the spies below once they have seen what they were looking for."""


def test_no_tune_malloc_reaches_image_features(cohort, tmp_path, monkeypatch):
    """``--no-tune-malloc``: image_features(tune_malloc=False) in every command that embeds patches; by default the
    function's own default (None); a speed setting, so not part of the fingerprint (a rerun skips)."""
    from spade_sc import _commands

    seen = []
    real = sp.pp.image_features

    def spy(*args, **kwargs):
        seen.append(kwargs.get("tune_malloc", "absent"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sp.pp, "image_features", spy)
    manifest = tmp_path / "one.csv"
    pd.DataFrame({"slide_id": ["slide0"], "path": [str(cohort / "slide0.zarr")]}).to_csv(manifest, index=False)
    out = tmp_path / "features"
    weights = ["--encoder", "test_resnet", "--encoder-weights", str(cohort / "encoder.safetensors"), "--quiet"]
    features = ["features", str(manifest), "--out", str(out), *weights]
    assert main([*features, "--no-tune-malloc"]) == 0
    assert seen == [False]
    assert json.loads((out / "run.json").read_text())["params"]["tune_malloc"] is False
    assert main(features) == 0 and seen == [False]  # same fingerprint: skipped
    assert main([*features, "--overwrite"]) == 0 and seen == [False, None]

    # embed and slides hand it to tl.embed / tl.slide_embeddings as a feature keyword
    calls = []
    monkeypatch.setattr(_commands, "_model", lambda path: None)
    monkeypatch.setattr(sp.tl, "embed", lambda *a, feature_kwargs, **k: calls.append(feature_kwargs["tune_malloc"]))
    monkeypatch.setattr(
        sp.tl, "slide_embeddings", lambda *a, feature_kwargs, **k: calls.append(feature_kwargs["tune_malloc"])
    )
    slide = _commands.Slide("slide0", str(cohort / "slide0.zarr"), "zarr")
    params = {"tiles": False, "mpp": 0.5, "patch_size": 32, "image_key": None, "batch_size": 8, "device": "cpu"}
    for step in (_commands.embed_step, _commands.slides_step):
        for value in (False, None):
            step(_commands.Task("x", slide, str(tmp_path), {**params, "tune_malloc": value}, "f"), None)
    assert calls == [False, None, False, None]

    # fit (features computed where missing) and evaluate
    def fit_spy(*args, feature_kwargs, **kwargs):
        calls.append(feature_kwargs["tune_malloc"])
        raise ValueError("stop here")

    monkeypatch.setattr(sp.tl, "fit", fit_spy)
    fit = ["fit", str(manifest), "--out", str(tmp_path / "model"), *weights, "--no-tune-malloc"]
    assert main(fit) == 2 and calls[-1] is False
    monkeypatch.setattr(sp.pp, "image_features", lambda *a, **k: calls.append(k["tune_malloc"]) or _raise(_Stop()))
    two = tmp_path / "two.csv"
    rows = {"slide_id": ["slide0", "slide1"], "path": [str(cohort / f"slide{i}.zarr") for i in (0, 1)]}
    pd.DataFrame(rows).to_csv(two, index=False)
    with pytest.raises(_Stop):
        main(["evaluate", str(two), "--out", str(tmp_path / "evaluation"), *weights, "--no-tune-malloc"])
    assert calls[-1] is False


def _raise(err: Exception) -> None:
    raise err


def test_out_below_a_file_exits_2_and_writes_nothing(cohort, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "file").write_text("x")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for out in ("a/file/b", "a/file/b/c"):  # the file one and two levels up
        target = str(tmp_path / out)
        err = _bad(["demo", "--data", "synthetic", "--out", target], capsys)
        assert f"--out {target}: {tmp_path / 'a' / 'file'} is a file" in err
        err = _bad(["features", str(cohort / "good.csv"), "--out", target], capsys)
        assert f"{tmp_path / 'a' / 'file'} is a file" in err
        model = ["--features-key", "X", "--checkpoint-dir", target]
        err = _bad(["fit", str(cohort / "good.csv"), "--out", str(tmp_path / "model"), *model], capsys)
        assert f"--checkpoint-dir {target}" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_fit_embed_slides_mil_evaluate(cohort, reference, tmp_path, capsys):
    manifest = str(cohort / "good.csv")
    model_dir, ckpt = tmp_path / "model", tmp_path / "ckpt"
    fit = ["fit", manifest, "--out", str(model_dir), "--features", str(reference), "--features-key", "X_test_resnet"]
    fit += ["--epochs", "2", "--batch-size", "32", "--n-experts", "2", "--checkpoint-dir", str(ckpt), "--quiet"]
    assert main(fit) == 0
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "failures.csv",
        "model.safetensors",
        "run.json",
        "spade-sc.log",
    ]
    model = sp.model.SpadeModel.load(model_dir)
    assert main(fit) == 0 and "skipped" in capsys.readouterr().out  # complete with the same inputs
    err = _bad([*fit, "--overwrite", "--resume", "--lr", "0.01"], capsys)  # another training's checkpoint
    assert "lr" in err and "0.01" in err
    model.save(model_dir, overwrite=True)  # a model folder (with its run records) may be replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        model.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"

    emb = tmp_path / "embed"
    embed = ["embed", manifest, "--model", str(model_dir), "--out", str(emb), "--features", str(reference), "--quiet"]
    assert main(embed) == 0
    import spatialdata as sd

    table = sd.read_zarr(emb / "slide1.zarr").tables["table"]
    assert table.obsm["X_spade"].shape == (table.n_obs, model.init_params_["proj_dim"])
    assert "spade_routing" in table.obsm and "spade_expert" in table.obs

    slides_dir = tmp_path / "slides"
    geometry = ["--mpp", "2", "--patch-size", "64", "--quiet"]
    assert main(["slides", manifest, "--model", str(model_dir), "--out", str(slides_dir), *geometry]) == 0
    import anndata as ad

    table = ad.read_h5ad(slides_dir / "slides.h5ad")
    assert list(table.obs_names) == ["slide0", "slide1", "slide2", "slide3"]
    assert list(table.obs["group"]) == ["a", "b", "a", "b"] and "X_spade" in table.obsm

    mil = tmp_path / "mil"
    mil_args = ["mil", str(slides_dir), "--label", "group", "--out", str(mil), "--folds", "2", "--epochs", "1"]
    assert "--resume needs --checkpoint-dir" in _bad([*mil_args, "--resume"], capsys)
    mil_ckpt = ["--checkpoint-dir", str(tmp_path / "mil_ckpt"), "--resume"]  # no checkpoint yet: from epoch 0
    assert main([*mil_args, "--heatmaps", "1", *mil_ckpt, "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "mil_ckpt").iterdir()) == ["cv_0", "cv_1"]  # one per split
    assert {"metrics.csv", "summary.csv", "predictions.csv", "splits.json", "run.json"} <= {
        p.name for p in mil.iterdir()
    }
    assert len(pd.read_csv(mil / "predictions.csv")) == 4  # out-of-fold: every slide once
    assert sorted(p.name for p in (mil / "models").iterdir()) == ["cv_0", "cv_1"]
    assert len(list((mil / "attention").glob("*.png"))) == 1

    two = pd.read_csv(manifest).head(2)
    two["path"] = [str(cohort / p) for p in two["path"]]
    two.to_csv(tmp_path / "two.csv", index=False)
    ev = tmp_path / "evaluate"
    evaluate = ["evaluate", str(tmp_path / "two.csv"), "--out", str(ev), "--features", str(reference)]
    evaluate += ["--features-key", "X_test_resnet", "--epochs", "1", "--n-experts", "1", "--n-draws", "1"]
    evaluate += ["--representations", "base,spade_soft", "--tasks", "expression", "--quiet"]
    assert main(evaluate) == 0
    scores = pd.read_csv(ev / "evaluation.csv")
    assert set(scores["representation"]) == {"base", "spade_soft"}
    assert json.loads((ev / "protocol.json").read_text())["features_key"] == "X_test_resnet"


# ---------------------------------------------------------------------------------------------------------------------
# real formats in one manifest: her2st sections written to .zarr, a Space Ranger folder, a whole-slide TIFF
# ---------------------------------------------------------------------------------------------------------------------
TILE = 512


def _tiles(rgb: np.ndarray):
    """The tiles of an (h, w, 3) array, row by row (tifffile pads the last row and column)."""
    for y in range(0, rgb.shape[0], TILE):
        for x in range(0, rgb.shape[1], TILE):
            yield np.ascontiguousarray(rgb[y : y + TILE, x : x + TILE])


def _upsampled_tiles(img: np.ndarray, shape: tuple[int, int], scale: float):
    """Tiles of ``img`` upsampled by nearest neighbour to ``shape``: output pixel p is input pixel (p + 0.5) * scale."""
    ys, xs = (
        np.minimum(((np.arange(n) + 0.5) * scale).astype(int), m - 1) for n, m in zip(shape, img.shape[:2], strict=True)
    )
    wide = np.repeat(img, np.bincount(xs, minlength=img.shape[1]), axis=1)  # columns first: one cheap repeat
    for y in range(0, shape[0], TILE):
        strip = wide[ys[y : y + TILE]]
        for x in range(0, shape[1], TILE):
            yield np.ascontiguousarray(strip[:, x : x + TILE])


def _write_tiff(path: Path, levels: list, shapes: list[tuple[int, int]], mpp: float) -> Path:
    """A tiled pyramidal JPEG TIFF (one page per level, tiles from ``levels``), the pixel size in its tags."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, (tiles, (h, w)) in enumerate(zip(levels, shapes, strict=True)):
            tw.write(
                tiles, shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                resolution=(1e4 / (mpp * shapes[0][1] / w),) * 2, resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1, metadata=None,
            )  # fmt: skip
    return path


def _her2st_crop(sdata, sid: str, side: int = 2048):
    """A ``side`` px square of a her2st section around its median spot: image (pyramid), spots, counts, pixel size."""
    import spatialdata as sd

    cx, cy = np.median(sdata.tables["table"].obsm["spatial"], axis=0)
    return sd.bounding_box_query(
        sdata, axes=("x", "y"), min_coordinate=[cx - side / 2, cy - side / 2],
        max_coordinate=[cx + side / 2, cy + side / 2], target_coordinate_system=sid, filter_table=True,
    )  # fmt: skip


def _visium_with_fullres(data_root: Path, folder: Path) -> Path:
    """The tiny Space Ranger folder (its files linked) with a full-resolution H&E beside them: its lowres image
    upsampled to the full-resolution pixels of its scale factors (13312 px square, 3 levels 4x apart)."""
    from PIL import Image

    source = data_root / "visium_heart_tiny"
    folder.mkdir()
    for name in ("filtered_feature_bc_matrix.h5", "spatial"):
        (folder / name).symlink_to(source / name)
    factors = json.loads((source / "spatial" / "scalefactors_json.json").read_text())
    low = np.asarray(Image.open(source / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    scale = factors["tissue_lowres_scalef"]
    side = int(low.shape[0] / scale) // 1024 * 1024
    shapes = [(side // 4**k, side // 4**k) for k in range(3)]
    levels = [_upsampled_tiles(low, shape, scale * 4**k) for k, shape in enumerate(shapes)]
    return _write_tiff(folder / "heart_he.tif", levels, shapes, 55.0 / factors["spot_diameter_fullres"])


@pytest.fixture(scope="module")
def real(her2st, data_root, cohort, tmp_path_factory):
    """A manifest of real inputs: her2st C3 and C5 (crops) as .zarr, the tiny Visium folder with a full-resolution
    TIFF in it (found without an image column), and a whole-slide TIFF cut from her2st C4."""
    from PIL import Image

    from spade_sc._image import image_levels

    root = tmp_path_factory.mktemp("real")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sid in ("C3", "C5"):
            _her2st_crop(her2st[sid], sid).write(root / f"{sid}.zarr")
    _visium_with_fullres(data_root, root / "heart")
    c4 = her2st["C4"]
    cx, cy = np.median(c4.tables["table"].obsm["spatial"], axis=0).astype(int)
    lv0 = image_levels(c4.images["C4_image"])[0]
    rgb = np.moveaxis(np.asarray(lv0.data[:, cy - 1024 : cy + 1024, cx - 1024 : cx + 1024]), 0, -1)
    levels = [rgb, *(np.asarray(Image.fromarray(rgb).reduce(2**k)) for k in (1, 2))]
    _write_tiff(root / "c4.tif", [_tiles(lv) for lv in levels], [lv.shape[:2] for lv in levels], sp.pp.pixel_size(c4))
    rows = [("C3", "C3.zarr", "", "a"), ("C5", "C5.zarr", "", "b"), ("heart", "heart", "visium", "a")]
    rows.append(("wsi", "c4.tif", "", "b"))
    frame = pd.DataFrame(rows, columns=["slide_id", "path", "format", "group"])
    frame.to_csv(root / "mixed.csv", index=False)
    frame.head(2).to_csv(root / "her2st.csv", index=False)
    return root


def test_real_formats_features_fit_embed(real, cohort, tmp_path, capsys):
    import spatialdata as sd

    encoder = ["--encoder", "test_resnet", "--encoder-weights", str(cohort / "encoder.safetensors")]
    quiet = ["--threads", "1", "--quiet"]
    features = tmp_path / "features"
    # spot features: her2st from .zarr, Visium from its full-resolution TIFF; the whole slide has no spots
    assert main(["features", str(real / "mixed.csv"), "--out", str(features), *encoder, *quiet]) == 1
    failures = pd.read_csv(features / "failures.csv")
    assert list(failures["slide_id"]) == ["wsi"] and "shapes" in failures["error"].iloc[0]
    assert sorted(p.name for p in features.glob("*.zarr")) == ["C3.zarr", "C5.zarr", "heart.zarr"]
    heart = sd.read_zarr(features / "heart.zarr").tables["table"]
    assert heart.obsm["X_test_resnet"].shape[0] == 100
    assert heart.uns["X_test_resnet"]["image_key"] == "heart_full_image"  # found in the folder, no image column
    source = sd.read_zarr(features / "heart.zarr").attrs["spade_sc"]["cohort"]["source"]
    assert source["image"].endswith("heart_he.tif")
    c3 = sd.read_zarr(features / "C3.zarr").tables["table"]
    assert 30 < c3.n_obs < 80 and np.isfinite(c3.obsm["X_test_resnet"]).all()

    model = tmp_path / "model"
    fit = ["fit", str(real / "her2st.csv"), "--out", str(model), "--features", str(features)]
    fit += ["--features-key", "X_test_resnet", "--epochs", "2", "--batch-size", "32", "--n-experts", "1", "--quiet"]
    assert main(fit) == 0

    # every format through embed, on tissue tiles (the whole slide has no spots)
    embedded = tmp_path / "embedded"
    embed = ["embed", str(real / "mixed.csv"), "--model", str(model), "--out", str(embedded), "--tiles"]
    embed += ["--features", str(features), "--mpp", "8", "--patch-size", "32", *quiet]
    assert main(embed) == 0
    tables = {"C3": "C3_image_tiles_table", "C5": "C5_image_tiles_table", "heart": "heart_full_image_tiles_table"}
    tables["wsi"] = "wsi_image_tiles_table"
    for sid, key in tables.items():
        table = sd.read_zarr(embedded / f"{sid}.zarr").tables[key]
        assert table.n_obs > 0 and table.obsm["X_spade"].shape == (table.n_obs, 256), sid
        assert np.isfinite(table.obsm["X_spade"]).all()
    capsys.readouterr()
    assert main(embed) == 0  # the same command again: every slide is complete
    assert "0 done, 4 skipped, 0 failed" in capsys.readouterr().out
