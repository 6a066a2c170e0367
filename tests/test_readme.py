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
    assert sorted(p.name for p in out.glob("*.zarr")) == ["slide0.zarr", "slide1.zarr", "slide2.zarr"]
    for png in ("loss.png", "experts_slide2.png"):
        assert (out / png).stat().st_size > 10_000
    assert main(args) == 2  # a user error: one line naming the folder, nothing changed


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "blocks[1]" in ci and "pytest collected no tests" in ci
    second = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[1]
    assert "pytest" in second
