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


def test_two_dask_workers_equal_the_serial_run(cohort, reference, tmp_path):
    out = tmp_path / "features"
    assert main(_features_args(cohort, out, "--workers", "2")) == 1
    assert json.loads((out / "run.json").read_text())["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    _assert_same(out, reference)


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
    assert "--workers" in _bad(["features", good, "--out", str(out), "--workers", "0"], capsys)
    assert "not a model folder" in _bad(["embed", good, "--model", str(tmp_path), "--out", str(out)], capsys)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in _bad(["features", good, "--out", str(tmp_path / "file")], capsys)
    t0 = time.time()
    err = _bad(["features", good, "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert "tcp://127.0.0.1:9" in err and time.time() - t0 < 30
    assert not out.exists()


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
    assert main(["mil", str(slides_dir), "--label", "group", "--out", str(mil), "--folds", "2", "--epochs", "1",
                 "--heatmaps", "1", "--quiet"]) == 0  # fmt: skip
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
