"""Check a built documentation: every tutorial page shows the figures its notebook draws, and no page holds a path
of the machine that built it.

Run after ``sphinx-build`` (``.ci/run`` does)::

    python docs/check_build.py docs/_build/html

Problems, one line each, then exit code 1:

- a notebook of ``tutorials/`` without its page ``tutorials/<name>.html``;
- a page with fewer images than the code cells of its notebook that draw (a cell calls ``plt.subplots``,
  ``plt.figure``, ``plt.show``, ``plt.imshow``, ``plt.plot`` / ``scatter`` / ``bar`` / ``hist`` or a ``.pl.<name>(``
  function of spade_sc, scanpy or spatialdata-plot; cells tagged ``remove-cell``, ``remove-output`` or
  ``no-figure`` are not counted), or an image whose file is missing from the build: the sign of a kernel that drew
  with a non-interactive matplotlib backend (``MPLBACKEND=agg``) or of figures closed before display;
- a page showing a traceback or tqdm's "IProgress not found" warning;
- any HTML page containing an absolute path of the build machine: the repository, the Python environment, the home
  folder, ``$SPADE_SC_DATA``, temporary folders made by :func:`tempfile.mkdtemp` or by the kernel (warnings name
  ``/tmp/ipykernel_<pid>/...``), and ``--forbid`` paths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: a code cell that draws at least one figure
FIGURE_CALL = re.compile(
    r"\bplt\.(subplots|figure|show|imshow|plot|scatter|bar|barh|hist)\(|\.pl\.[A-Za-z_]\w*\(",
)
#: tags of cells whose output is not on the page, or which draw nothing on purpose
SKIP_TAGS = {"remove-cell", "remove-output", "no-figure"}
#: text that must never be on a tutorial page
BAD_OUTPUT = {
    "Traceback (most recent call last)": "a cell raised",
    "IProgress not found": "tqdm's IProgress warning (install ipywidgets or pass progress=False)",
    "TqdmWarning": "a tqdm warning",
}
IMG = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]+)\"", re.S)


def figure_cells(notebook: Path) -> int:
    """Code cells of a notebook that draw a figure."""
    nb = json.loads(notebook.read_text())
    n = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        if SKIP_TAGS & set(cell.get("metadata", {}).get("tags", [])):
            continue
        source = "".join(cell.get("source", []))
        code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())  # comments do not draw
        n += bool(FIGURE_CALL.search(code))
    return n


def page_images(page: Path) -> tuple[int, list[str]]:
    """(images on a page, sources of those whose file is missing)."""
    srcs = [s for s in IMG.findall(page.read_text(errors="replace")) if not s.startswith(("http:", "https:", "data:"))]
    missing = [s for s in srcs if not (page.parent / s.split("#", 1)[0]).is_file()]
    return len(srcs), missing


def machine_paths(extra: list[str]) -> list[str]:
    """Absolute paths of this machine that a page must not show (deepest first, at least two levels deep)."""
    candidates = [ROOT, ROOT.resolve(), Path(sys.prefix), Path(sys.prefix).resolve(), Path.home()]
    if os.environ.get("SPADE_SC_DATA"):
        data = Path(os.environ["SPADE_SC_DATA"]).expanduser()
        candidates += [data.absolute(), data.resolve()]
    candidates += [Path(p) for p in extra]
    out = {str(p) for p in candidates if len(Path(p).parts) >= 3 or (len(Path(p).parts) == 2 and p == Path.home())}
    return sorted(out, key=len, reverse=True)


def path_pattern(paths: list[str]) -> re.Pattern[str]:
    """One regex for the paths (as whole path prefixes) and for mkdtemp folders."""
    parts = [re.escape(p) + r"(?=[/\"'<\s]|$)" for p in paths]
    parts.append(re.escape(tempfile.gettempdir().rstrip("/")) + r"/(?:tmp[A-Za-z0-9_]{8}\b|ipykernel_\d+)")
    return re.compile(r"(?<![\w.-])(?:" + "|".join(parts) + ")")


def check(build: Path, tutorials: Path, forbid: list[str]) -> tuple[list[str], list[str]]:
    """(problems, report lines)."""
    problems, report = [], []
    for notebook in sorted(tutorials.glob("*.ipynb")):
        page = build / "tutorials" / f"{notebook.stem}.html"
        if not page.is_file():
            problems.append(f"{notebook.name}: no page tutorials/{page.name} in {build.name}/")
            continue
        expected = figure_cells(notebook)
        found, missing = page_images(page)
        report.append(f"tutorials/{page.name}: {found} images, {expected} cells of {notebook.name} draw")
        if found < expected:
            problems.append(
                f"tutorials/{page.name}: {found} images but {expected} cells of {notebook.name} draw a figure "
                "(kernel with a non-interactive matplotlib backend, e.g. MPLBACKEND=agg?)"
            )
        problems += [f"tutorials/{page.name}: image {src} is missing from the build" for src in missing]
        text = page.read_text(errors="replace")
        problems += [f"tutorials/{page.name}: {why}" for bad, why in BAD_OUTPUT.items() if bad in text]
    pattern = path_pattern(machine_paths(forbid))
    for page in sorted(build.rglob("*.html")):
        for i, line in enumerate(page.read_text(errors="replace").splitlines(), 1):
            m = pattern.search(line)
            if m:
                problems.append(f"{page.relative_to(build)}:{i}: absolute path of the build machine {m.group(0)!r}")
    return problems, report


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", nargs="?", default=str(ROOT / "docs" / "_build" / "html"), help="the HTML build")
    parser.add_argument("--tutorials", default=str(ROOT / "tutorials"), help="the notebooks' folder")
    parser.add_argument("--forbid", action="append", default=[], help="another path that no page may show")
    args = parser.parse_args(argv)
    build = Path(args.build)
    if not (build / "index.html").is_file():
        print(f"check_build: {build} is not an HTML build (no index.html)", file=sys.stderr)
        return 1
    problems, report = check(build, Path(args.tutorials), args.forbid)
    print("\n".join(report))
    if problems:
        print(f"check_build: {len(problems)} problem(s):", file=sys.stderr)
        print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    print("check_build: every tutorial page shows its figures; no machine path in the HTML")
    return 0


if __name__ == "__main__":
    sys.exit(main())
