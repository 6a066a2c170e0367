"""``tl.fit(checkpoint_dir=, resume=)``: a fit killed by SIGKILL and resumed ends with bitwise the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
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
