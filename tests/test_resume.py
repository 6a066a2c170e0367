"""``tl.fit(checkpoint_dir=, resume=)``: a fit killed by SIGKILL and resumed ends with bitwise the same weights."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spade_sc as sp

#: The training run by every process of the kill / resume test (one torch thread, seeded, dropout on).
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch
    import lightning as L
    import spade_sc as sp

    torch.set_num_threads(1)
    out, ckpt, resume, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])

    class Slow(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            time.sleep(slow)

    cohort = sp.datasets.synthetic(n_slides=3, n_spots=60, image_size=512, seed=0)
    rng = np.random.default_rng(0)
    for sdata in cohort.values():
        t = sdata.tables["table"]
        t.obsm["X_test"] = rng.normal(size=(t.n_obs, 24)).astype(np.float32)
    model = sp.tl.fit(
        cohort,
        features_key="X_test",
        n_experts=2,
        max_epochs=12,
        batch_size=16,
        lr=3e-2,
        validation_slides=["slide2"],
        early_stopping_patience=20,
        seed=3,
        progress=False,
        model_kwargs={"proj_dim": 16},
        trainer_kwargs={"accelerator": "cpu", "callbacks": [Slow()] if slow else []},
        checkpoint_dir=None if ckpt == "-" else ckpt,
        resume=resume,
    )
    json.dump({"fingerprint": model.fingerprint(), "history": model.history_,
               "best_epoch": model.train_params_["best_epoch"]}, open(out, "w"))
    """
)


def _run(tmp_path: Path, name: str, ckpt: str, resume: bool, slow: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tmp_path / f"{name}.json"), ckpt, "1" if resume else "0", str(slow)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]


def _epochs_done(ckpt: Path) -> int:
    record = ckpt / "last" / "checkpoint.json"
    try:
        return json.loads(record.read_text())["epochs_done"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_fit_killed_and_resumed_reaches_the_same_weights(tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = _run(tmp_path, "killed", str(ckpt), resume=False, slow=0.4)
    reference = _run(tmp_path, "reference", "-", resume=False)  # uninterrupted, no checkpoint at all
    deadline = time.time() + 180
    while _epochs_done(ckpt) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the training ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    done = _epochs_done(ckpt)
    assert 3 <= done < 12
    _finish(reference)
    _finish(_run(tmp_path, "resumed", str(ckpt), resume=True))

    ref = json.loads((tmp_path / "reference.json").read_text())
    res = json.loads((tmp_path / "resumed.json").read_text())
    assert res["fingerprint"] == ref["fingerprint"]  # bitwise the same weights
    assert res["history"] == ref["history"]  # the same losses, the epochs before the kill included
    assert res["best_epoch"] == ref["best_epoch"]
    assert _epochs_done(ckpt) == 12
    assert not [p for p in ckpt.iterdir() if p.name != "last"]  # no temporaries left
    files = sorted(p.name for p in (ckpt / "last").iterdir())
    assert files == ["checkpoint.json", "checkpoint.safetensors"]  # safetensors + JSON, no pickle


def _cohort():
    cohort = sp.datasets.synthetic(n_slides=3, n_spots=60, image_size=512, seed=0)
    rng = np.random.default_rng(0)
    for sdata in cohort.values():
        t = sdata.tables["table"]
        t.obsm["X_test"] = rng.normal(size=(t.n_obs, 24)).astype(np.float32)
    return cohort


def _fit(cohort, ckpt, **kwargs):
    params = {
        "features_key": "X_test",
        "n_experts": 2,
        "max_epochs": 2,
        "batch_size": 16,
        "validation_slides": ["slide2"],
        "progress": False,
        "model_kwargs": {"proj_dim": 16},
        "trainer_kwargs": {"accelerator": "cpu"},
        "checkpoint_dir": ckpt,
    }
    return sp.tl.fit(cohort, **{**params, **kwargs})


def test_resume_refuses_another_training(tmp_path, one_torch_thread):
    ckpt = tmp_path / "ckpt"
    cohort = _cohort()
    _fit(cohort, ckpt)
    assert (ckpt / "last" / "checkpoint.json").is_file()
    with pytest.raises(FileExistsError, match="resume=True"):
        _fit(_cohort(), ckpt)  # a checkpoint is there: never overwritten silently
    with pytest.raises(ValueError, match=r"training lr: checkpoint 0\.001, now 0\.01"):
        _fit(_cohort(), ckpt, resume=True, lr=1e-2)
    with pytest.raises(ValueError, match=r"slides removed \['slide1'\]"):
        two = _cohort()
        del two["slide1"]
        _fit(two, ckpt, resume=True)
    # the finished checkpoint resumes to the same model without training again
    again = _fit(_cohort(), ckpt, resume=True)
    first = _fit(_cohort(), None)
    assert again.fingerprint() == first.fingerprint()
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        _fit(_cohort(), None, resume=True)


# ---------------------------------------------------------------------------------------------------------------------
# train_mil(checkpoint_dir=, resume=): every split's training checkpointed at every epoch
# ---------------------------------------------------------------------------------------------------------------------
def mil_cohort(n_slides: int = 8, dim: int = 6) -> dict:
    """Slides without images, whose tiles (as pp.tile_tissue lays them out) carry the class in a few tiles."""
    import geopandas as gpd
    import numpy as np
    import pandas as pd
    import shapely
    from anndata import AnnData
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(0)
    cohort = {}
    for i in range(n_slides):
        n = int(rng.integers(12, 20))
        x = rng.normal(size=(n, dim))
        x[: n // 3, i % 2] += 2.0
        ids = np.arange(n)
        boxes = np.stack([ids * 10, 0 * ids, ids * 10 + 10, 0 * ids + 10], 1).astype(float)
        gdf = gpd.GeoDataFrame(geometry=shapely.box(*boxes.T), index=pd.Index(ids, name="tile_id"))
        obs = pd.DataFrame({"tile_id": ids, "region": pd.Categorical(["image_tiles"] * n)}, index=ids.astype(str))
        table = AnnData(obs=obs)
        table.obsm["X_feat"] = x.astype(np.float32)
        table.uns["tile_tissue"] = {"image_key": "image", "mpp": 1.0, "tile_size": 10}
        s = SpatialData()
        s.shapes["image_tiles"] = ShapesModel.parse(gdf, transformations={"global": Identity()})
        s.tables["image_tiles_table"] = TableModel.parse(
            table, region="image_tiles", region_key="region", instance_key="tile_id"
        )
        s.attrs["spade_sc"] = {"slide": {"label": i % 2}}
        cohort[f"s{i}"] = s
    return cohort


#: train_mil with two folds, one torch thread, dropout on; prints what must match after a kill and a resume.
MIL_SCRIPT = (
    "import hashlib, json, sys, time\nimport lightning as L\nimport torch\nimport spade_sc as sp\n\n"
    + textwrap.dedent(inspect.getsource(mil_cohort))
    + textwrap.dedent(
        """
        torch.set_num_threads(1)
        out, ckpt, resume, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])

        class Slow(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                time.sleep(slow)

        res = sp.tl.train_mil(
            mil_cohort(), label_key="label", features_key="X_feat", folds=2, max_epochs=8, hidden=16,
            attention_dim=8, dropout=0.25, lr=1e-2, seed=5,
            trainer_kwargs={"accelerator": "cpu", "callbacks": [Slow()] if slow else []},
            checkpoint_dir=None if ckpt == "-" else ckpt, resume=resume,
        )
        weights = [
            hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(m.module.state_dict().items()))).hexdigest()
            for m in res.models
        ]
        json.dump({"weights": weights, "predictions": res.predictions.to_json(),
                   "history": [m.train_params_["loss_history"] for m in res.models]}, open(out, "w"))
        """
    )
)


def _run_mil(tmp_path: Path, name: str, ckpt: str, resume: bool, slow: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "train_mil.py"
    script.write_text(MIL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tmp_path / f"{name}.json"), ckpt, "1" if resume else "0", str(slow)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)


def test_train_mil_killed_and_resumed_reaches_the_same_models(tmp_path):
    ckpt = tmp_path / "ckpt"
    killed = _run_mil(tmp_path, "killed", str(ckpt), resume=False, slow=0.4)
    reference = _run_mil(tmp_path, "reference", "-", resume=False)  # uninterrupted, no checkpoint at all
    deadline = time.time() + 180
    while _epochs_done(ckpt / "cv_1") < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the training ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)  # the first split finished, the second one in the middle
    killed.wait()
    assert _epochs_done(ckpt / "cv_0") == 8 and 3 <= _epochs_done(ckpt / "cv_1") < 8
    _finish(reference)
    _finish(_run_mil(tmp_path, "resumed", str(ckpt), resume=True))

    ref = json.loads((tmp_path / "reference.json").read_text())
    res = json.loads((tmp_path / "resumed.json").read_text())
    assert res["weights"] == ref["weights"]  # bitwise the same models
    assert res["history"] == ref["history"] and res["predictions"] == ref["predictions"]
    assert _epochs_done(ckpt / "cv_1") == 8
    files = ["checkpoint.json", "checkpoint.safetensors"]  # safetensors + JSON, no pickle
    assert [sorted(p.name for p in (ckpt / split / "last").iterdir()) for split in ("cv_0", "cv_1")] == [files] * 2


def test_train_mil_resume_refuses_another_training(tmp_path, one_torch_thread):
    ckpt = tmp_path / "ckpt"
    settings = {"label_key": "label", "features_key": "X_feat", "folds": 2, "max_epochs": 2, "hidden": 8}
    settings.update(attention_dim=4, seed=1, checkpoint_dir=ckpt)
    first = sp.tl.train_mil(mil_cohort(), **settings)
    with pytest.raises(FileExistsError, match="resume=True"):
        sp.tl.train_mil(mil_cohort(), **settings)
    with pytest.raises(ValueError, match=r"training lr: checkpoint 0\.0002, now 0\.01"):
        sp.tl.train_mil(mil_cohort(), **settings, resume=True, lr=1e-2)
    with pytest.raises(ValueError, match=r"cv_0 was made by another training: .*slides (added|removed)"):
        sp.tl.train_mil(mil_cohort(n_slides=7), **settings, resume=True)  # another split plan
    again = sp.tl.train_mil(mil_cohort(), **settings, resume=True)  # finished: restored, not trained again
    pd.testing.assert_frame_equal(again.predictions, first.predictions)
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        sp.tl.train_mil(mil_cohort(), **{**settings, "checkpoint_dir": None}, resume=True)
