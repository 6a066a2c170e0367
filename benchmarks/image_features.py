"""Benchmarks of spade_sc.pp.image_features / tile_tissue; prints ratios measured in one run.

P1  end-to-end throughput of image_features from a zarr-backed image, divided by the throughput of the encoder
    alone on the same number of preloaded uint8 tensors (same encoder, same batch size). Goal >= 0.85.
P2  peak resident memory of tiling (whole slide) + embedding (first --p2-tiles tiles) of a zarr-backed slide of
    20,000 and 40,000 px, each in a fresh subprocess (VmHWM, and RSS sampled every 50 ms). Goal < 2 GB and flat
    when the image grows 4x.

P1-TIFF / P2-TIFF (``--source tiff`` or ``both``): the same two measures on a pyramidal tiled TIFF (JPEG tiles, levels
    4x apart, pixel size in the resolution tags; written once by the benchmark) read through
    ``spade_sc.io.read_wsi``: no zarr in between. Goals: P1 ratio >= 0.85; P2 < 2 GB and flat for 4x the pixels.

SPEED (``--speed``): throughput of the configurations of ``--speed-configs`` (default ``today,new``; the first is the
    reference): "today" is the encoder as the package ran it before issue 16 (NCHW, eager, glibc's allocator left
    alone), "new" the defaults (channels-last and a frozen TorchScript trace for convolutional models on CPU, the
    allocator scope of ``spade_sc._malloc``); "channels_last", "malloc", "jit", "cl_malloc" and "new_bf16" isolate
    changes. The first batch (which traces the model) is a warm-up outside the timed part. Model-only (preloaded
    uint8 tensors) and end-to-end ``image_features`` (from the zarr slide, or the TIFF with ``--source tiff``) are
    each run in a fresh process, configurations interleaved over ``--speed-repeats`` rounds; printed: patches/s, CPU
    ms per patch (all threads; steadier than wall time on a shared machine), peak RSS, and ratios to the reference.

The slides are procedural H&E-like images (a tissue ellipse with nuclei-like texture on glass), rendered chunk by
chunk with dask and written to zarr with ``SpatialData.write`` (every pyramid level is rendered at its own
resolution, so writing never holds a whole level in memory). ``spade_sc.datasets.synthetic`` renders ~1 Mpx/s,
too slow to write 1.6 Gpx within a benchmark run; this renderer is ~100x faster.

    python benchmarks/image_features.py                       # default run (~5-10 min on 2 cores)
    python benchmarks/image_features.py --quick               # small sizes, a minute or two
    python benchmarks/image_features.py --sizes 10000 20000 --p2-tiles 64 --skip-p1
    python benchmarks/image_features.py --source tiff         # P1 / P2 from TIFFs through spade_sc.io.read_wsi
    python benchmarks/image_features.py --speed --speed-configs today,channels_last,malloc,new --p1-spots 192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MPP = 0.5
CHUNK = 1024
GLASS = np.array([242.0, 240.0, 245.0], dtype=np.float32)
STROMA = np.array([226.0, 150.0, 196.0], dtype=np.float32)
NUCLEUS = np.array([95.0, 50.0, 130.0], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# a fast procedural slide
# ---------------------------------------------------------------------------------------------------------------------
def _render(y0: int, x0: int, h: int, w: int, mpp: float, size_um: float, seed: int) -> np.ndarray:
    """(3, h, w) uint8 block of the slide at ``mpp`` um/px, top-left pixel (y0, x0)."""
    y = ((np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * mpp)[:, None]
    x = ((np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * mpp)[None, :]
    c = size_um / 2
    tissue = ((x - c) / (0.42 * size_um)) ** 2 + ((y - c) / (0.33 * size_um)) ** 2 < 1.0
    # nuclei: bright spots of a product of sines (period ~9-12 um), blurred away at coarse levels
    nuc = np.sin(x * 0.71 + 1.3 * np.sin(y * 0.05)) * np.sin(y * 0.53 + 1.1 * np.sin(x * 0.04))
    damp = np.float32(min(1.0, 2.0 / mpp))
    frac = np.clip((nuc - 0.55) * 4.0, 0.0, 1.0) * damp
    rng = np.random.default_rng([seed, y0, x0])
    noise = rng.integers(-6, 7, size=(h, w), dtype=np.int8).astype(np.float32)
    rgb = STROMA[:, None, None] * (1 - frac) + NUCLEUS[:, None, None] * frac + noise
    rgb = np.where(tissue[None], rgb, GLASS[:, None, None] + 0.5 * noise)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _lazy_level(size: int, mpp: float, size_um: float, seed: int):
    import dask.array as da

    def block(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return _render(y0, x0, y1 - y0, x1 - x0, mpp, size_um, seed)

    chunks = da.core.normalize_chunks((3, CHUNK, CHUNK), (3, size, size))
    return da.map_blocks(block, dtype=np.uint8, chunks=chunks)


def fast_slide(size: int, *, n_spots: int = 0, seed: int = 0):
    """A SpatialData with a lazy multiscale image (``"image"``), and ``n_spots`` spots + table when > 0."""
    import anndata as ad
    import dask.array as da
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely.geometry import Point
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    import spade_sc as sp

    size_um = size * MPP
    n_levels = 1
    while size // 2**n_levels >= 512:
        n_levels += 1
    image = Image2DModel.parse(
        da.zeros((3, size, size), dtype=np.uint8, chunks=(3, CHUNK, CHUNK)),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * (n_levels - 1) or None,
        chunks=(3, CHUNK, CHUNK),
        transformations={"global": Identity()},
    )
    nodes = [image[f"scale{k}"]["image"] for k in range(n_levels)] if n_levels > 1 else [image]
    for node in nodes:
        h = node.sizes["y"]
        node.data = _lazy_level(h, size_um / h, size_um, seed)
    elements: dict = {"images": {"image": image}}
    if n_spots:
        rng = np.random.default_rng(seed)
        xy = []
        while len(xy) < n_spots:
            p = rng.uniform(0, size_um, 2)
            if ((p[0] - size_um / 2) / (0.4 * size_um)) ** 2 + ((p[1] - size_um / 2) / (0.3 * size_um)) ** 2 < 1:
                xy.append(p / MPP)
        xy = np.asarray(xy)
        circles = gpd.GeoDataFrame({"radius": np.full(n_spots, 27.5 / MPP)}, geometry=[Point(*p) for p in xy])
        elements["shapes"] = {"spots": ShapesModel.parse(circles, transformations={"global": Identity()})}
        obs = pd.DataFrame({"spot_id": np.arange(n_spots), "region": pd.Categorical(["spots"] * n_spots)})
        obs.index = obs.index.astype(str)
        table = ad.AnnData(X=sparse.csr_matrix((n_spots, 1), dtype=np.float32), obs=obs)
        elements["tables"] = {
            "table": TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
        }
    sdata = SpatialData(**elements)
    sp.pp.set_pixel_size(sdata, MPP, coordinate_system="global")
    return sdata


def write_slide(path: Path, size: int, n_spots: int = 0) -> float:
    """Render and write a slide to zarr; returns the seconds it took."""
    import dask

    t = time.perf_counter()
    sdata = fast_slide(size, n_spots=n_spots)
    with dask.config.set(scheduler="threads"):
        sdata.write(path, overwrite=True)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------------------
# the same slide as a pyramidal TIFF (read through spade_sc.io.read_wsi)
# ---------------------------------------------------------------------------------------------------------------------
TIFF_TILE = 512


def write_tiff(path: Path, size: int, *, quality: int = 85, seed: int = 0) -> float:
    """Render the slide tile by tile into a tiled pyramidal TIFF (JPEG, levels 4x apart); returns the seconds taken.

    Every level is rendered at its own resolution and streamed to tifffile tile by tile, so writing never holds a
    level in memory; the pixel size is in the resolution tags (centimetres), as scanners write it.
    """
    import tifffile

    t = time.perf_counter()
    size_um = size * MPP
    factors = [1]
    while size // (factors[-1] * 4) >= 512:
        factors.append(factors[-1] * 4)

    def tiles(h: int, mpp: float):
        for y in range(0, h, TIFF_TILE):
            for x in range(0, h, TIFF_TILE):
                yield np.moveaxis(_render(y, x, TIFF_TILE, TIFF_TILE, mpp, size_um, seed), 0, -1)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, f in enumerate(factors):
            h = size // f
            tw.write(
                tiles(h, size_um / h),
                shape=(h, h, 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                resolution=(1e4 / (size_um / h),) * 2,
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                maxworkers=os.cpu_count(),
            )
    return time.perf_counter() - t


def add_spots(sdata, n_spots: int, size: int, coordinate_system: str, seed: int = 0) -> None:
    """Spots in the tissue ellipse (as :func:`fast_slide` places them) and their table, added to ``sdata``."""
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    from scipy import sparse
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    size_um = size * MPP
    rng = np.random.default_rng(seed)
    xy = []
    while len(xy) < n_spots:
        p = rng.uniform(0, size_um, 2)
        if ((p[0] - size_um / 2) / (0.4 * size_um)) ** 2 + ((p[1] - size_um / 2) / (0.3 * size_um)) ** 2 < 1:
            xy.append(p / MPP)
    xy = np.asarray(xy)
    circles = gpd.GeoDataFrame({"radius": np.full(n_spots, 27.5 / MPP)}, geometry=[Point(*p) for p in xy])
    sdata.shapes["spots"] = ShapesModel.parse(circles, transformations={coordinate_system: Identity()})
    obs = pd.DataFrame({"spot_id": np.arange(n_spots), "region": pd.Categorical(["spots"] * n_spots)})
    obs.index = obs.index.astype(str)
    table = ad.AnnData(X=sparse.csr_matrix((n_spots, 1), dtype=np.float32), obs=obs)
    sdata.tables["table"] = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")


def _throughput(sdata, enc, batch_size: int, num_workers: int | None, repeats: int) -> dict:
    """Model-only vs end-to-end ``image_features`` times (triplets back to back), as in :func:`p1`."""
    import torch

    import spade_sc as sp

    n = len(sdata.tables["table"])
    x = torch.randint(0, 256, (n, 3, enc.input_size, enc.input_size), dtype=torch.uint8)
    enc(x[:batch_size])  # warm-up

    def model_only() -> float:
        from spade_sc._malloc import keep_freed_memory

        t = time.perf_counter()
        with keep_freed_memory():  # as image_features runs its encoder loop
            for i in range(0, n, batch_size):
                enc(x[i : i + batch_size])
        return time.perf_counter() - t

    def end_to_end(workers: int | None) -> float:
        t = time.perf_counter()
        sp.pp.image_features(
            sdata, encoder=enc, shapes_key="spots", batch_size=batch_size, num_workers=workers, progress=False,
            inplace=False,
        )  # fmt: skip
        return time.perf_counter() - t

    t_model, t_e2e, t_sync = [], [], []
    for _ in range(repeats):
        t_model.append(model_only())
        t_e2e.append(end_to_end(num_workers))
        t_sync.append(end_to_end(0))
    ratios = [m / e for m, e in zip(t_model, t_e2e, strict=True)]
    ratios_sync = [m / e for m, e in zip(t_model, t_sync, strict=True)]
    return {
        "n_patches": n,
        "model_only_patches_per_s": round(n / float(np.median(t_model)), 2),
        "end_to_end_patches_per_s": round(n / float(np.median(t_e2e)), 2),
        "end_to_end_no_prefetch_patches_per_s": round(n / float(np.median(t_sync)), 2),
        "ratio": round(float(np.median(ratios)), 3),
        "ratio_no_prefetch": round(float(np.median(ratios_sync)), 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def p1_tiff(
    workdir: Path, size: int, n_spots: int, batch_size: int, encoder: str, num_workers: int | None, repeats: int
) -> dict:
    """P1 on a pyramidal TIFF read through ``spade_sc.io.read_wsi``."""
    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    path = workdir / f"p1_{size}.tif"
    t_write = write_tiff(path, size)
    sdata = sp.io.read_wsi(path, name="slide")
    add_spots(sdata, n_spots, size, "slide")
    enc = get_encoder(encoder)
    out = {"image_px": size, "file_mb": round(path.stat().st_size / 2**20, 1), "write_s": round(t_write, 1)}
    out.update({"batch_size": batch_size, "encoder": enc.name, "num_workers": num_workers})
    out.update(_throughput(sdata, enc, batch_size, num_workers, repeats))
    path.unlink()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# P1
# ---------------------------------------------------------------------------------------------------------------------
def _mean_module():
    """A trivial torch module: the mean colour of each patch (torch is imported lazily)."""
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    return Mean()


def p1(
    workdir: Path, size: int, n_spots: int, batch_size: int, encoder: str, num_workers: int | None, repeats: int
) -> dict:
    import spatialdata
    import torch

    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    path = workdir / f"p1_{size}.zarr"
    t_write = write_slide(path, size, n_spots)
    sdata = spatialdata.read_zarr(path)
    enc = get_encoder(encoder)
    n = len(sdata.tables["table"])
    x = torch.randint(0, 256, (n, 3, enc.input_size, enc.input_size), dtype=torch.uint8)
    enc(x[:batch_size])  # warm-up

    def model_only() -> float:
        from spade_sc._malloc import keep_freed_memory

        t = time.perf_counter()
        with keep_freed_memory():  # as image_features runs its encoder loop
            for i in range(0, n, batch_size):
                enc(x[i : i + batch_size])
        return time.perf_counter() - t

    def end_to_end(workers: int | None) -> float:
        t = time.perf_counter()
        sp.pp.image_features(
            sdata, encoder=enc, batch_size=batch_size, num_workers=workers, progress=False, inplace=False
        )
        return time.perf_counter() - t

    # Triplets run back to back, so that a change of the machine's load affects the members of a triplet alike;
    # the ratio is the median of the per-triplet ratios.
    t_model, t_e2e, t_sync = [], [], []
    for _ in range(repeats):
        t_model.append(model_only())
        t_e2e.append(end_to_end(num_workers))
        t_sync.append(end_to_end(0))
    # reading + resampling alone (calling thread, a trivial encoder): the headroom of the reader over the model
    trivial = get_encoder(_mean_module(), input_size=enc.input_size, mean=(0, 0, 0), std=(1, 1, 1), name="mean")
    t = time.perf_counter()
    sp.pp.image_features(sdata, encoder=trivial, batch_size=batch_size, num_workers=0, progress=False, inplace=False)
    t_read = time.perf_counter() - t
    ratios = [m / e for m, e in zip(t_model, t_e2e, strict=True)]
    ratios_sync = [m / e for m, e in zip(t_model, t_sync, strict=True)]
    return {
        "image_px": size,
        "n_patches": n,
        "batch_size": batch_size,
        "encoder": enc.name,
        "num_workers": num_workers,
        "write_s": round(t_write, 1),
        "model_only_patches_per_s": round(n / float(np.median(t_model)), 2),
        "end_to_end_patches_per_s": round(n / float(np.median(t_e2e)), 2),
        "end_to_end_no_prefetch_patches_per_s": round(n / float(np.median(t_sync)), 2),
        "reader_only_patches_per_s": round(n / t_read, 2),
        "ratio": round(float(np.median(ratios)), 3),
        "ratio_no_prefetch": round(float(np.median(ratios_sync)), 3),
        "ratios": [round(r, 3) for r in ratios],
        "timings_s": {
            "model_only": [round(t, 2) for t in t_model],
            "end_to_end": [round(t, 2) for t in t_e2e],
            "no_prefetch": [round(t, 2) for t in t_sync],
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# P2 (child process per size)
# ---------------------------------------------------------------------------------------------------------------------
def _rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        stop.wait(0.05)


def _vm_hwm() -> int:
    """Peak resident set size of this process (bytes) from /proc (VmHWM; reset by exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def p2_child(path: Path, n_tiles: int, batch_size: int, encoder: str) -> dict:
    """Tile the whole slide and embed its first ``n_tiles`` tiles; memory of this process."""
    import spatialdata
    from spatialdata import SpatialData

    import spade_sc as sp
    from spade_sc.encoders import get_encoder

    enc = get_encoder(encoder)  # tiny: random init is fine for memory
    import psutil

    base = psutil.Process().memory_info().rss
    peak = [0]
    stop = threading.Event()
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    t = time.perf_counter()
    # a TIFF is read through spade_sc.io.read_wsi (lazy pyramid of the file's levels), a zarr store by spatialdata
    sdata = sp.io.read_wsi(path, name="slide") if path.suffix == ".tif" else spatialdata.read_zarr(path)
    key = next(iter(sdata.images))
    sp.pp.tile_tissue(sdata, image_key=key)
    t_tile = time.perf_counter() - t
    tiles = sdata.shapes[f"{key}_tiles"]
    table = sdata.tables[f"{key}_tiles_table"]
    n_all = table.n_obs
    sub_table = table[: min(n_tiles, n_all)].copy()
    sub = SpatialData(
        images={key: sdata.images[key]},
        shapes={f"{key}_tiles": tiles.loc[sub_table.obs["tile_id"].to_numpy()]},
        tables={f"{key}_tiles_table": sub_table},
        attrs=sdata.attrs,
    )
    t = time.perf_counter()
    sp.pp.image_features(sub, encoder=enc, shapes_key=f"{key}_tiles", batch_size=batch_size, progress=False)
    t_embed = time.perf_counter() - t
    stop.set()
    sampler.join()
    maxrss = _vm_hwm()
    return {
        "n_tiles_total": int(n_all),
        "n_tiles_embedded": int(sub_table.n_obs),
        "tile_s": round(t_tile, 1),
        "embed_s": round(t_embed, 1),
        "rss_before_mb": round(base / 2**20),
        "peak_rss_mb": round(max(maxrss, peak[0]) / 2**20),
        "peak_above_before_mb": round((max(maxrss, peak[0]) - base) / 2**20),
    }


def p2(workdir: Path, sizes: list[int], n_tiles: int, batch_size: int, encoder: str, source: str = "zarr") -> dict:
    out = {}
    for size in sizes:
        path = workdir / f"p2_{size}.{'tif' if source == 'tiff' else 'zarr'}"
        t_write = write_tiff(path, size) if source == "tiff" else write_slide(path, size)
        cmd = [
            sys.executable,
            __file__,
            "--_p2-child",
            str(path),
            "--p2-tiles",
            str(n_tiles),
            "--batch-size",
            str(batch_size),
            "--p2-encoder",
            encoder,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            msg = f"P2 child failed for size {size}"
            raise RuntimeError(msg)
        info = json.loads(res.stdout.strip().splitlines()[-1])
        info["write_s"] = round(t_write, 1)
        out[size] = info
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            info["file_mb"] = round(path.stat().st_size / 2**20, 1)
            path.unlink()
        print(f"P2 ({source}) {size} px: {info}", flush=True)
    peaks = [out[s]["peak_rss_mb"] for s in sizes]
    above = [out[s]["peak_above_before_mb"] for s in sizes]
    return {
        "per_size": out,
        "peak_rss_mb": peaks,
        "peak_above_before_mb": above,
        "ratio_above_before": round(above[-1] / max(above[0], 1), 3),
        "ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3),
        "pixels_ratio": round((sizes[-1] / sizes[0]) ** 2, 2),
    }


def _run_zarr(args: argparse.Namespace, workdir: Path) -> dict:
    results = {}
    if not args.skip_p1:
        r = p1(
            workdir,
            args.p1_size,
            args.p1_spots,
            args.batch_size,
            args.p1_encoder,
            args.num_workers,
            args.p1_repeats,
        )
        results["P1"] = r
        print(f"P1 {r}", flush=True)
        print(
            f"P1 ratio end-to-end / model-only throughput: {r['ratio']:.3f} (goal >= 0.85; "
            f"without prefetching: {r['ratio_no_prefetch']:.3f}); reader alone / model alone throughput: "
            f"{r['reader_only_patches_per_s'] / r['model_only_patches_per_s']:.1f}",
            flush=True,
        )
    if not args.skip_p2:
        r = p2(workdir, args.sizes, args.p2_tiles, args.batch_size, args.p2_encoder)
        results["P2"] = r
        print(
            f"P2 peak RSS (MB) at {args.sizes} px: {r['peak_rss_mb']}; ratio largest/smallest "
            f"{r['ratio_largest_to_smallest']:.3f} for {r['pixels_ratio']}x the pixels (goal < 2048 MB, flat); "
            f"above the RSS after imports + encoder: {r['peak_above_before_mb']} MB (ratio "
            f"{r['ratio_above_before']:.3f})",
            flush=True,
        )
    return results


def _run_tiff(args: argparse.Namespace, workdir: Path) -> dict:
    results = {}
    if not args.skip_p1:
        r = p1_tiff(
            workdir, args.p1_size, args.p1_spots, args.batch_size, args.p1_encoder, args.num_workers, args.p1_repeats
        )
        results["P1_tiff"] = r
        print(f"P1-TIFF {r}", flush=True)
        print(
            f"P1-TIFF ratio end-to-end from the TIFF / model-only throughput: {r['ratio']:.3f} (goal >= 0.85; "
            f"without prefetching: {r['ratio_no_prefetch']:.3f})",
            flush=True,
        )
    if not args.skip_p2:
        r = p2(workdir, args.sizes, args.p2_tiles, args.batch_size, args.p2_encoder, source="tiff")
        results["P2_tiff"] = r
        print(
            f"P2-TIFF peak RSS (MB) at {args.sizes} px: {r['peak_rss_mb']}; ratio largest/smallest "
            f"{r['ratio_largest_to_smallest']:.3f} for {r['pixels_ratio']}x the pixels (goal < 2048 MB, flat); "
            f"above the RSS after imports + encoder: {r['peak_above_before_mb']} MB (ratio "
            f"{r['ratio_above_before']:.3f})",
            flush=True,
        )
    return results


# ---------------------------------------------------------------------------------------------------------------------
# SPEED: today's settings vs the new defaults, every (configuration, measure) in its own fresh process
# ---------------------------------------------------------------------------------------------------------------------
#: name -> (get_encoder channels_last, get_encoder jit, image_features tune_malloc, get_encoder precision). "today"
#: is the package as it ran before issue 16: NCHW, eager, glibc left alone, fp32; "new" its defaults.
SPEED_CONFIGS = {
    "today": (False, False, False, None),
    "channels_last": (None, False, False, None),
    "malloc": (False, False, True, None),
    "jit": (False, True, False, None),
    "cl_malloc": (None, False, None, None),
    "new": (None, None, None, None),
    "new_bf16": (None, None, None, "bf16"),
}


def _open_source(path: Path, n_spots: int):
    """The P1 slide: a zarr store written by :func:`write_slide`, or a TIFF read through ``read_wsi`` + spots."""
    import spatialdata

    import spade_sc as sp

    if path.suffix == ".tif":
        sdata = sp.io.read_wsi(path, name="slide")
        size = int(next(iter(sdata.images.values()))["scale0"]["image"].sizes["x"])
        add_spots(sdata, n_spots, size, "slide")
        return sdata, "spots"
    return spatialdata.read_zarr(path), None


def speed_child(config: str, measure: str, path: Path, n_spots: int, batch_size: int, encoder: str) -> dict:
    """One measure of one configuration in this (fresh) process: patches/s and peak resident memory."""
    import torch

    import spade_sc as sp
    from spade_sc._malloc import keep_freed_memory
    from spade_sc.encoders import get_encoder

    channels_last, jit, tune, precision = SPEED_CONFIGS[config]
    enc = get_encoder(encoder, device="cpu", channels_last=channels_last, jit=jit, precision=precision)
    x = torch.randint(0, 256, (n_spots, 3, enc.input_size, enc.input_size), dtype=torch.uint8)
    enc(x[:batch_size])  # warm-up (oneDNN primitives), outside the timed part as in every configuration
    if measure == "model":
        t, c = time.perf_counter(), time.process_time()
        with keep_freed_memory(tune):
            for i in range(0, n_spots, batch_size):
                enc(x[i : i + batch_size])
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    else:
        sdata, shapes_key = _open_source(path, n_spots)
        t, c = time.perf_counter(), time.process_time()
        sp.pp.image_features(
            sdata, encoder=enc, shapes_key=shapes_key, batch_size=batch_size, progress=False, inplace=False,
            tune_malloc=tune,
        )  # fmt: skip
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return {
        "config": config,
        "measure": measure,
        "patches_per_s": round(n_spots / seconds, 2),
        # CPU time of all the process's threads: less sensitive than wall time to other jobs on a shared machine
        "cpu_ms_per_patch": round(1e3 * cpu / n_spots, 2),
        "peak_rss_mb": round(_vm_hwm() / 2**20),
        "channels_last": enc.channels_last,
        "jit": enc.jit,
        "precision": enc.precision,
    }


def speed(
    workdir: Path, source: str, configs: list[str], size: int, n_spots: int, batch_size: int, encoder: str, repeats: int
) -> dict:
    """Every configuration x (model-only, end-to-end), each in a fresh process, interleaved over ``repeats`` rounds."""
    if source == "tiff":
        path = workdir / f"speed_{size}.tif"
        write_tiff(path, size)
    else:
        path = workdir / f"speed_{size}.zarr"
        write_slide(path, size, n_spots)
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(repeats):
        for config in configs:
            for measure in ("model", "e2e"):
                cmd = [sys.executable, __file__, "--_speed-child", json.dumps([config, measure, str(path)])]
                cmd += ["--p1-spots", str(n_spots), "--batch-size", str(batch_size), "--p1-encoder", encoder]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(res.stdout, res.stderr, file=sys.stderr)
                    msg = f"speed child failed: {config} {measure}"
                    raise RuntimeError(msg)
                info = json.loads(res.stdout.strip().splitlines()[-1])
                runs.setdefault((config, measure), []).append(info)
                print(f"SPEED ({source}) round {r}: {info}", flush=True)
    pps = {k: [i["patches_per_s"] for i in v] for k, v in runs.items()}
    cpu = {k: [i["cpu_ms_per_patch"] for i in v] for k, v in runs.items()}
    med = {k: float(np.median(v)) for k, v in pps.items()}
    out: dict = {"source": source, "n_patches": n_spots, "batch_size": batch_size, "encoder": encoder}
    out["patches_per_s"] = {f"{c}/{m}": v for (c, m), v in pps.items()}
    out["peak_rss_mb"] = {f"{c}/{m}": max(i["peak_rss_mb"] for i in v) for (c, m), v in runs.items()}
    # ratios within each round (the members of a round ran back to back), then the median over rounds
    base = configs[0]
    for config in configs[1:]:
        for m in ("model", "e2e"):
            ratios = [a / b for a, b in zip(pps[(config, m)], pps[(base, m)], strict=True)]
            out[f"{config}/{base} {m}"] = round(float(np.median(ratios)), 3)
            ratios = [b / a for a, b in zip(cpu[(config, m)], cpu[(base, m)], strict=True)]
            out[f"{config}/{base} {m} by CPU time"] = round(float(np.median(ratios)), 3)
    for config in configs:
        ratios = [a / b for a, b in zip(pps[(config, "e2e")], pps[(config, "model")], strict=True)]
        out[f"{config} e2e/model"] = round(float(np.median(ratios)), 3)
    out["median_patches_per_s"] = {f"{c}/{m}": round(v, 2) for (c, m), v in med.items()}
    out["cpu_ms_per_patch"] = {f"{c}/{m}": v for (c, m), v in cpu.items()}
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink()
    return out


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--p1-size", type=int, default=8192, help="side of the P1 slide (px)")
    ap.add_argument("--p1-spots", type=int, default=192, help="patches embedded in P1")
    ap.add_argument("--p1-encoder", default="efficientnet_lite0")
    ap.add_argument("--p1-repeats", type=int, default=3, help="(model-only, end-to-end, no-prefetch) triplets")
    ap.add_argument("--num-workers", type=int, default=None, help="image_features num_workers in P1")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 40000], help="P2 slide sides (px)")
    ap.add_argument("--p2-tiles", type=int, default=256, help="tiles embedded in P2 (tiling covers the whole slide)")
    ap.add_argument("--p2-encoder", default="mobilenetv3_small_050")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="where the zarr stores go (default: a temp dir)")
    ap.add_argument(
        "--source",
        choices=("zarr", "tiff", "both"),
        default="zarr",
        help="slides written to zarr (read by spatialdata), to pyramidal TIFF (read by spade_sc.io.read_wsi), or both",
    )
    ap.add_argument("--skip-p1", action="store_true")
    ap.add_argument("--skip-p2", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: --p1-size 4096 --p1-spots 128 --p1-repeats 1 --sizes 5000 10000 --p2-tiles 64",
    )
    ap.add_argument("--_p2-child", dest="p2_child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--speed",
        action="store_true",
        help="only the SPEED measure: --speed-configs, model-only and end-to-end, each in a fresh process",
    )
    ap.add_argument(
        "--speed-configs",
        default="today,new",
        help=f"comma-separated, the first is the reference; choices {', '.join(SPEED_CONFIGS)}",
    )
    ap.add_argument("--speed-repeats", type=int, default=3, help="interleaved rounds of the SPEED measure")
    ap.add_argument("--_speed-child", dest="speed_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("spade_sc").setLevel(logging.ERROR)
    if args.p2_child is not None:
        print(json.dumps(p2_child(args.p2_child, args.p2_tiles, args.batch_size, args.p2_encoder)))
        return
    if args.speed_child is not None:
        config, measure, path = json.loads(args.speed_child)
        print(json.dumps(speed_child(config, measure, Path(path), args.p1_spots, args.batch_size, args.p1_encoder)))
        return
    if args.quick:
        args.p1_size, args.p1_spots, args.sizes, args.p2_tiles, args.p1_repeats = 4096, 128, [5000, 10000], 64, 1
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="spade_sc_bench_")
        workdir = Path(tmp)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    print(f"cpus: {os.cpu_count()}, workdir: {workdir}", flush=True)
    results = {}
    try:
        sources = ("zarr", "tiff") if args.source == "both" else (args.source,)
        if args.speed:
            configs = args.speed_configs.split(",")
            for source in sources:
                r = speed(
                    workdir, source, configs, args.p1_size, args.p1_spots, args.batch_size, args.p1_encoder,
                    args.speed_repeats,
                )  # fmt: skip
                results[f"SPEED_{source}"] = r
                print(f"SPEED ({source}) {json.dumps(r)}", flush=True)
            sources = ()
        if "zarr" in sources:
            results.update(_run_zarr(args, workdir))
        if "tiff" in sources:
            results.update(_run_tiff(args, workdir))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
