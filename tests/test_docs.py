"""The tutorials as stored (notebooks without outputs, reached by the docs) and the check of a built documentation."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def _check_build():
    spec = importlib.util.spec_from_file_location("check_build", ROOT / "docs" / "check_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorials_are_notebooks_without_outputs():
    assert {p.stem for p in TUTORIALS} >= {"quickstart", "own_data", "compare", "whole_slides", "scaling"}
    for path in TUTORIALS:
        nb = json.loads(path.read_text())
        assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3", path.name
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: stored outputs"
        assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# "), path.name


def test_docs_reach_every_tutorial_through_one_copy():
    link = ROOT / "docs" / "tutorials"
    assert link.is_symlink() and link.resolve() == (ROOT / "tutorials").resolve()
    toc = (ROOT / "docs" / "tutorials.md").read_text()
    for path in TUTORIALS:
        assert f"tutorials/{path.stem}\n" in toc, f"{path.name} is not in the toctree of docs/tutorials.md"
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((tutorials/[^)]+)\)", readme):
        assert (ROOT / target).exists(), target


def _fake_build(tmp_path: Path, n_images: int, extra: str = "") -> tuple[Path, Path]:
    """A notebook with two drawing cells and one that draws nothing, and a built page with ``n_images`` images."""
    tutorials = tmp_path / "tutorials"
    tutorials.mkdir()
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# A tutorial"]},
        {"cell_type": "code", "metadata": {}, "source": ["fig, ax = plt.subplots()\n", "ax.plot([1, 2])"]},
        {"cell_type": "code", "metadata": {}, "source": ["sp.pl.training_curves(model)"]},
        {"cell_type": "code", "metadata": {}, "source": ["x = 1  # plt.subplots() in a comment draws nothing"]},
        {"cell_type": "code", "metadata": {"tags": ["remove-output"]}, "source": ["plt.figure()"]},
    ]
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}
    (tutorials / "demo.ipynb").write_text(json.dumps(nb))
    build = tmp_path / "html"
    (build / "tutorials").mkdir(parents=True)
    (build / "_images").mkdir()
    (build / "index.html").write_text("<html>index</html>")
    imgs = ""
    for i in range(n_images):
        (build / "_images" / f"fig{i}.png").write_bytes(b"png")
        imgs += f'<img alt="_images/fig{i}.png" src="../_images/fig{i}.png" />\n'
    (build / "tutorials" / "demo.html").write_text(f"<html>{imgs}{extra}</html>")
    return build, tutorials


def test_check_build_passes_a_page_with_its_figures(tmp_path):
    cb = _check_build()
    # a path that shares only its top folder with this checkout is not a path of the build machine
    top = Path(__file__).resolve().parts[1]
    build, tutorials = _fake_build(tmp_path, 2, extra=f"<p>the path /{top}/example in a sentence</p>")
    assert cb.main([str(build), "--tutorials", str(tutorials)]) == 0


def test_check_build_counts_the_drawing_cells(tmp_path):
    cb = _check_build()
    build, tutorials = _fake_build(tmp_path, 0)
    assert cb.figure_cells(tutorials / "demo.ipynb") == 2
    assert cb.page_images(build / "tutorials" / "demo.html") == (0, [])


@pytest.mark.parametrize(
    ("n_images", "extra", "found"),
    [
        (1, "", "1 images but 2 cells of demo.ipynb draw a figure"),
        (0, "", "0 images but 2 cells"),
        (2, '<img src="../_images/gone.png" />', "image ../_images/gone.png is missing"),
        (2, "<pre>TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.</pre>", "IProgress"),
        (2, "<pre>Traceback (most recent call last):</pre>", "a cell raised"),
        (2, f"<pre>{ROOT}/.venv/lib/python3.11/site-packages/x.py:3: UserWarning</pre>", "absolute path"),
        (2, "<pre>/tmp/ipykernel_4242/123.py:5: UserWarning</pre>", "absolute path"),
        (2, "<pre>saved to /tmp/tmpab12cd34/model</pre>", "absolute path"),
    ],
)
def test_check_build_fails_a_broken_page(tmp_path, capsys, n_images, extra, found):
    cb = _check_build()
    build, tutorials = _fake_build(tmp_path, n_images, extra)
    assert cb.main([str(build), "--tutorials", str(tutorials)]) == 1
    assert found in capsys.readouterr().err


def test_check_build_fails_without_a_page_or_a_build(tmp_path, capsys):
    cb = _check_build()
    build, tutorials = _fake_build(tmp_path, 2)
    (build / "tutorials" / "demo.html").unlink()
    assert cb.main([str(build), "--tutorials", str(tutorials)]) == 1
    assert "no page tutorials/demo.html" in capsys.readouterr().err
    assert cb.main([str(tmp_path / "nothing"), "--tutorials", str(tutorials)]) == 1


def test_check_build_forbids_extra_paths(tmp_path, capsys):
    cb = _check_build()
    build, tutorials = _fake_build(tmp_path, 2, extra="<p>/data/site/secret/file.h5</p>")
    assert cb.main([str(build), "--tutorials", str(tutorials)]) == 0
    assert cb.main([str(build), "--tutorials", str(tutorials), "--forbid", "/data/site/secret"]) == 1
