"""Every command in the README runs somewhere: the test command in .ci/run, the rest here."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path):
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    out = subprocess.run([sys.executable, "-c", block], check=True, cwd=tmp_path, capture_output=True, text=True)
    assert ", 256)" in out.stdout  # the embedding of the new slide
    assert (tmp_path / "my_model" / "model.safetensors").is_file()


def test_readme_main_job_is_the_demo():
    first = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0]
    assert first.strip().endswith("spade-sc demo")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "spade-sc demo" in ci  # .ci/run runs the main job itself


def test_demo_cli_small(tmp_path):
    from spade_sc.cli import main

    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--n-slides",
        "3",
        "--n-spots",
        "60",
        "--image-size",
        "768",
    ]
    assert main([*args, "--epochs", "3", "--quiet"]) == 0
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in out.glob("*.zarr")) == ["slide2.zarr"]  # the held-out slide, with X_spade
    for png in ("loss.png", "expression_slide2.png", "comparison.png"):
        assert (out / png).stat().st_size > 10_000
    scores = (out / "comparison.csv").read_text()
    assert "X_spade" in scores and "base" in scores  # SPADE against the encoder on the held-out slide
    assert main(args) == 2  # a user error: one line naming the folder, nothing changed


def test_demo_says_which_data_and_refuses_a_wrong_data_folder(tmp_path, monkeypatch, capsys):
    from spade_sc._demo import choose_data
    from spade_sc.cli import main

    monkeypatch.delenv("SPADE_SC_DATA", raising=False)
    data, root, why = choose_data("auto")
    assert data == "synthetic" and root is None and "SPADE_SC_DATA is not set" in why
    monkeypatch.setenv("SPADE_SC_DATA", str(tmp_path))  # a folder without her2st/: an error, not a fallback
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no her2st/ folder" in err and str(tmp_path) in err
    assert not (tmp_path / "out").exists()
    assert choose_data("synthetic")[0] == "synthetic"  # asked for explicitly
    (tmp_path / "her2st").mkdir()
    data, root, why = choose_data("auto")
    assert data == "her2st" and root == tmp_path / "her2st" and "holds her2st/" in why


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "blocks[1]" in ci and "pytest collected no tests" in ci
    second = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[1]
    assert "pytest" in second
    assert second.strip().startswith(". .venv/bin/activate && ")  # works in a new terminal, with the venv of command 1
    assert '.replace(". .venv/bin/activate", ". .ci-venv/bin/activate")' in ci  # .ci/run's venv stands in for it


def test_readme_answers_a_newcomer():
    first = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0]
    assert "SPADE_SC_DATA=${SPADE_SC_DATA:-../shared/data} spade-sc demo" in first and "[leiden]" in first
    for needed in (
        "## Tutorials",
        "## Your own data",
        "sp.io.read_visium",
        "sp.io.read_hest",
        "sp.io.read_wsi",
        "download.pytorch.org/whl/cpu",
        "GPU",
        "minutes",
    ):
        assert needed in README, needed
    for name in re.findall(r"`([a-z_]+\.ipynb)`", README):
        assert (ROOT / "tutorials" / name).is_file(), name
