"""spade_sc vs LazySlide vs sopa: patch embedding side by side on the same tiles, the same encoder weights.

The tissue tiles of one her2st section (default C2) are embedded with the package's EfficientNet-Lite0 ImageNet
weights (timm ``tf_efficientnet_lite0``, 1280-d), batch 64, by

- ``spade_sc``: ``sp.pp.image_features`` on the tiles of ``sp.pp.tile_tissue`` (its defaults: channels-last on
  CPU, the allocator scope);
- ``lazyslide`` / ``lazyslide_w1``: ``lazyslide.tl.feature_extraction`` on the same tiles (added with
  ``wsidata.io.add_tiles``), ``num_workers=0`` (its default) / 1;
- ``sopa``: ``sopa.patches.compute_embeddings`` with the tiles as its region of interest (its patch grid starts at
  the image corner with the same step, so its patches are the same tiles);
- ``model_nchw`` / ``model_cl`` / ``model_spade``: the model alone on preloaded uint8 tensors: NCHW, eager, glibc
  left alone (what a plain torch loop gets); channels-last, eager, inside the allocator scope; and spade_sc's
  encoder as it runs by default (channels-last, frozen TorchScript trace, allocator scope): the ceilings.

The section's H&E (about 0.74 um/px) is resampled once to 0.5 um/px and written as a pyramidal JPEG TIFF that every
tool reads through tiffslide, so that a 224 px tile at 0.5 um/px is a 224 px window of level 0 for all of them
(nobody resizes). Every (tool, round) runs in its own fresh process, the tools interleaved round by round, so that
no tool inherits another's allocator state or warm caches; each reports patches/s (wall), CPU time per patch (all
threads; less sensitive to other jobs on a shared machine) and peak resident memory (VmHWM, imports included).

The model-only rows time their loop after a warm-up batch (which traces the model for ``model_spade``). spade_sc's
row builds its encoder as ``image_features`` does by default and times its one-off ``Encoder.warm_up`` (the trace and
the first runs of the frozen graph) apart from the call: ``cpu_ms_per_patch`` is the call alone (comparable with the
model-only rows: their ratio is end-to-end / model-only), ``total_cpu_ms_per_patch`` includes the warm-up (what one
``image_features`` call with an encoder name costs; the peers' rows, which trace nothing, are compared with it).

A tool that is not installed is skipped with a message (``pip install 'spade_sc[bench]'`` installs both peers);
``--peer-python`` runs the peers with another interpreter (e.g. a virtual environment that has them).

    python benchmarks/peers.py                       # 2 rounds, 2 threads (~10-15 min on 2 cores)
    python benchmarks/peers.py --rounds 3 --threads 1 --section C3
    python benchmarks/peers.py --tools spade_sc,model_nchw,model_cl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MPP = 0.5
TILE = 224
TOOLS = ("spade_sc", "lazyslide", "lazyslide_w1", "sopa", "model_nchw", "model_cl", "model_spade")
PEERS = {"lazyslide": "lazyslide", "lazyslide_w1": "lazyslide", "sopa": "sopa"}


# ---------------------------------------------------------------------------------------------------------------------
# the slide and its tiles (parent process)
# ---------------------------------------------------------------------------------------------------------------------
def write_slide(root: str | None, section: str, path: Path) -> dict:
    """The section's H&E resampled to 0.5 um/px, written as a tiled pyramidal JPEG TIFF (levels 4x apart)."""
    import tifffile
    from PIL import Image

    import spade_sc as sp
    from spade_sc._image import image_levels

    sdata = sp.datasets.her2st(root, sections=[section])[section]
    key = next(iter(sdata.images))
    level = image_levels(sdata.images[key])[0]
    mpp0 = sp.pp.pixel_size(sdata)
    rgb = np.moveaxis(np.asarray(level.data), 0, -1)
    h, w = round(rgb.shape[0] * mpp0 / MPP), round(rgb.shape[1] * mpp0 / MPP)
    img = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    del rgb
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        factor = 1
        while min(h, w) // factor >= 512:
            sub = img if factor == 1 else np.asarray(Image.fromarray(img).reduce(factor))
            tw.write(
                sub,
                tile=(512, 512),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                resolution=(1e4 / (MPP * factor),) * 2,
                resolutionunit="CENTIMETER",
                subfiletype=0 if factor == 1 else 1,
                maxworkers=os.cpu_count(),
            )
            factor *= 4
    return {"section": section, "source_mpp": round(float(mpp0), 4), "size_px": [h, w]}


def spade_sc_tiles(path: Path):
    """The slide read through ``sp.io.read_wsi`` and its tissue tiles (``sp.pp.tile_tissue`` defaults)."""
    import spade_sc as sp

    sdata = sp.io.read_wsi(path, name="slide")
    sp.pp.tile_tissue(sdata, mpp=MPP, tile_size=TILE)
    return sdata


def _tiles_key(sdata) -> str:
    return f"{next(iter(sdata.images))}_tiles"


def tile_corners(path: Path) -> np.ndarray:
    """(n, 2) top-left corners (x, y) of the tiles in level-0 pixels."""
    sdata = spade_sc_tiles(path)
    bounds = sdata.shapes[_tiles_key(sdata)].geometry.bounds.to_numpy()
    return np.rint(bounds[:, :2]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# one tool in a fresh process (child)
# ---------------------------------------------------------------------------------------------------------------------
def _vm_hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lite0_module(channels_last_input: bool = False):
    """The packaged EfficientNet-Lite0 weights as a plain torch module: float [0, 1] (N, 3, H, W) -> (N, 1280)."""
    import torch

    from spade_sc.encoders import get_encoder

    backbone = get_encoder(device="cpu", channels_last=False, jit=False).model

    class Lite0(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone((x - 0.5) / 0.5)

    return Lite0().eval()


def _run_spade_sc(sdata, batch_size: int, corners: np.ndarray) -> tuple[int, float, float, dict]:
    """``image_features`` with its default encoder, built and warmed up as the call would, the warm-up timed apart."""
    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    assert len(sdata.shapes[_tiles_key(sdata)]) == len(corners)
    t, c = time.perf_counter(), time.process_time()
    enc = get_encoder(device="auto")  # what image_features(encoder="efficientnet_lite0") builds
    enc.warm_up()  # the one-off trace, which image_features would do first (a no-op when called again)
    warm = {"warmup_s": round(time.perf_counter() - t, 2), "warmup_cpu_s": round(time.process_time() - c, 2)}
    t, c = time.perf_counter(), time.process_time()
    feats = sp.pp.image_features(
        sdata,
        encoder=enc,
        shapes_key=_tiles_key(sdata),
        mpp=MPP,
        patch_size=TILE,
        batch_size=batch_size,
        progress=False,
        inplace=False,
    )
    return len(feats), time.perf_counter() - t, time.process_time() - c, warm


def _run_lazyslide(path: Path, batch_size: int, corners: np.ndarray, workers: int) -> int:
    import lazyslide as zs
    import torch
    from wsidata import TileSpec, open_wsi
    from wsidata.io import add_tiles

    wsi = open_wsi(path, reader="tiffslide", store=None)
    spec = TileSpec.from_wsidata(wsi, TILE)
    add_tiles(wsi, "tiles", corners.astype(float), spec, np.zeros(len(corners), dtype=int))
    to_tensor = lambda t: torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1).float().div(255.0)
    feats = zs.tl.feature_extraction(
        wsi, lite0_module(), tile_key="tiles", transform=to_tensor, batch_size=batch_size, num_workers=workers,
        device="cpu", pbar=False, return_features=True,
    )  # fmt: skip
    return len(feats)


def _run_sopa(path: Path, batch_size: int, corners: np.ndarray) -> int:
    import geopandas as gpd
    import sopa
    from shapely.geometry import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    sdata = sopa.io.wsi(path, backend="tiffslide")
    image = next(iter(sdata.images.values()))
    # the tiles, shrunk by a pixel: each touches exactly one patch of sopa's grid, the tile itself
    roi = gpd.GeoDataFrame(geometry=[box(x + 1, y + 1, x + TILE - 1, y + TILE - 1) for x, y in corners])
    sdata.shapes["roi"] = ShapesModel.parse(roi, transformations=get_transformation(image, get_all=True))
    key = sopa.patches.compute_embeddings(
        sdata, lite0_module(), patch_width=TILE, level=0, roi_key="roi", batch_size=batch_size, device="cpu"
    )
    return int(sdata.tables[key].n_obs)


def _run_model(n: int, batch_size: int, how: str) -> int:
    import torch

    from spade_sc._malloc import keep_freed_memory
    from spade_sc.encoders import get_encoder

    kw = {"nchw": {"channels_last": False, "jit": False}, "cl": {"jit": False}, "spade": {}}[how]
    enc = get_encoder(device="cpu", **kw)
    x = torch.randint(0, 256, (n, 3, TILE, TILE), dtype=torch.uint8)
    enc(x[:batch_size])  # the first batch traces the model (jit): outside the timed part, as its weights loading
    t, c = time.perf_counter(), time.process_time()
    with keep_freed_memory(how != "nchw"):  # spade_sc's scope; NCHW as a plain torch loop
        for i in range(0, n, batch_size):
            enc(x[i : i + batch_size])
    return n, time.perf_counter() - t, time.process_time() - c


def child(tool: str, path: Path, corners_path: Path, batch_size: int, threads: int) -> dict:
    """Embed the tiles with one tool in this process; the timed part starts after imports and model loading."""
    import importlib.util

    import torch

    if importlib.util.find_spec("spade_sc") is None:  # a peers-only interpreter: spade_sc from the source tree
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    torch.set_num_threads(threads)
    corners = np.load(corners_path)
    lite0_module()(torch.zeros(2, 3, TILE, TILE))  # load the weights once outside the timed part, for every tool
    # the tiles are given to every tool: spade_sc's tiling (read_wsi + tile_tissue) is done before the timed part
    tiled = spade_sc_tiles(path) if tool == "spade_sc" else None
    runs = {
        "spade_sc": lambda: _run_spade_sc(tiled, batch_size, corners),
        "lazyslide": lambda: _run_lazyslide(path, batch_size, corners, 0),
        "lazyslide_w1": lambda: _run_lazyslide(path, batch_size, corners, 1),
        "sopa": lambda: _run_sopa(path, batch_size, corners),
        "model_nchw": lambda: _run_model(len(corners), batch_size, "nchw"),
        "model_cl": lambda: _run_model(len(corners), batch_size, "cl"),
        "model_spade": lambda: _run_model(len(corners), batch_size, "spade"),
    }
    t, c = time.perf_counter(), time.process_time()
    n = runs[tool]()
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    total_cpu, extra = cpu, {}
    if isinstance(n, tuple):  # model-only and spade_sc: timed without their warm-up
        n, seconds, cpu, *rest = n
        extra = rest[0] if rest else {}
    out = {
        "tool": tool,
        "n_patches": n,
        "patches_per_s": round(n / seconds, 2),
        "cpu_ms_per_patch": round(1e3 * cpu / n, 1),
        "peak_rss_mb": round(_vm_hwm_mb()),
    }
    if extra:
        out.update(extra, total_cpu_ms_per_patch=round(1e3 * total_cpu / n, 1))
        out["total_patches_per_s"] = round(n / (time.perf_counter() - t), 2)
    return out


def _available(tool: str, python: str) -> str | None:
    """None when ``tool`` can run with ``python``, else why not."""
    module = PEERS.get(tool)
    if module is None:
        return None
    res = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return f"{module} is not importable with {python} ({last}); pip install 'spade_sc[bench]'"
    return None


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="her2st folder (default $SPADE_SC_DATA/her2st)")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated among {', '.join(TOOLS)}")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (every tool once per round)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every tool")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter that runs LazySlide and sopa")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("spade_sc").setLevel(logging.ERROR)
    if args.child is not None:
        tool, path, corners = json.loads(args.child)
        print(json.dumps(child(tool, Path(path), Path(corners), args.batch_size, args.threads)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="spade_sc_peers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    path, corners_path = workdir / f"{args.section}_0.5mpp.tif", workdir / "tiles.npy"
    if not path.exists():
        info = write_slide(args.root, args.section, path)
        print(f"slide: {info}, {path.stat().st_size / 2**20:.0f} MB", flush=True)
    np.save(corners_path, tile_corners(path))
    n = len(np.load(corners_path))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} tissue tiles of {TILE} px at {MPP} um/px; {args.threads} threads, batch {args.batch_size}; load {load}")
    tools = []
    for tool in args.tools.split(","):
        why = _available(tool, args.peer_python)
        if why is None:
            tools.append(tool)
        else:
            print(f"skipping {tool}: {why}", flush=True)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools:
            python = args.peer_python if tool in PEERS else sys.executable
            cmd = [python, __file__, "--_child", json.dumps([tool, str(path), str(corners_path)])]
            cmd += ["--threads", str(args.threads), "--batch-size", str(args.batch_size)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"{tool} failed:\n{res.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            info = json.loads(res.stdout.strip().splitlines()[-1])
            runs[tool].append(info)
            print(f"round {r}: {info}", flush=True)
    summarise(runs, n, load)


def summarise(runs: dict[str, list[dict]], n: int, load: float) -> None:
    """Median patches/s, CPU ms per patch and peak RSS per tool, every tool relative to spade_sc, and spade_sc's
    end-to-end / model-only ratio (round by round, warm-up excluded from both as in the model-only rows)."""
    rows = {t: v for t, v in runs.items() if v}

    def med(v: list[dict], key: str) -> float:
        return float(np.median([i[key] for i in v]))

    spade = rows.get("spade_sc")
    # the peers trace nothing: they are compared with spade_sc's whole call, its one-off warm-up included
    ref = med(spade, "total_patches_per_s") if spade else None
    ref_cpu = med(spade, "total_cpu_ms_per_patch") if spade else None
    print("\n| tool | patches | patches/s (wall) | CPU ms / patch | peak RSS MB | spade_sc / tool (wall, CPU) |")
    print("|---|---|---|---|---|---|")
    for tool, v in rows.items():
        lines = [(tool, "patches_per_s", "cpu_ms_per_patch")]
        if tool == "spade_sc":
            lines = [
                ("spade_sc, warm-up excluded", *lines[0][1:]),
                ("spade_sc", "total_patches_per_s", "total_cpu_ms_per_patch"),
            ]
        for name, pps_key, cpu_key in lines:
            pps, cpu = med(v, pps_key), med(v, cpu_key)
            rss = max(i["peak_rss_mb"] for i in v)
            rel = f"{ref / pps:.2f}, {cpu / ref_cpu:.2f}" if ref else "-"
            print(f"| {name} | {v[0]['n_patches']} | {pps:.1f} | {cpu:.0f} | {rss} | {rel} |")
    if spade and rows.get("model_spade"):
        pairs = list(zip(spade, rows["model_spade"], strict=False))  # the members of a round ran back to back
        cpu = [m["cpu_ms_per_patch"] / s["cpu_ms_per_patch"] for s, m in pairs]
        cpu_total = [m["cpu_ms_per_patch"] / s["total_cpu_ms_per_patch"] for s, m in pairs]
        wall = [s["patches_per_s"] / m["patches_per_s"] for s, m in pairs]
        print(
            f"\nspade_sc end-to-end / model-only (model_spade), per round: CPU time {_fmt(cpu)}, wall {_fmt(wall)} "
            f"(warm-up excluded from both); CPU time with spade_sc's one-off warm-up {_fmt(cpu_total)} "
            f"(warm-up {_fmt([s['warmup_cpu_s'] for s in spade])} CPU s)"
        )
    print(f"\n{n} tiles; {len(next(iter(rows.values())))} rounds; load average at the start {load:.1f}")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
