"""Benchmark of the ``spade-sc`` cohort runner; prints ratios measured in one run.

C1  ``spade-sc features`` over 8 synthetic slides: serial vs ``--workers 2`` (a Dask LocalCluster of 2 processes,
    one torch thread per task in both runs): the speed-up (serial time / Dask time) and the overhead of the Dask path
    per slide (Dask time x workers - serial time, over the slides: the cost of starting the cluster, shipping tasks
    and loading the encoder in every worker).
C2  resume overhead: a rerun over the finished cohort (every slide skipped after checking its fingerprint), in
    seconds per slide, command start-up excluded and included.

Every run is a fresh ``spade-sc`` process (``python -m spade_sc.cli``), as a user would run it.

    python benchmarks/cohort.py                      # 8 slides of 1024 px, ~200 spots each
    python benchmarks/cohort.py --slides 4 --image-size 512 --spots 60   # a quick look
    python benchmarks/cohort.py --encoder efficientnet_lite0              # the default encoder (slower)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _cohort(root: Path, n: int, spots: int, size: int) -> Path:
    import pandas as pd

    import spade_sc as sp

    slides = sp.datasets.synthetic(n_slides=n, n_spots=spots, image_size=size, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, sdata in slides.items():
            sdata.write(root / f"{name}.zarr")
    manifest = root / "manifest.csv"
    pd.DataFrame({"slide_id": list(slides), "path": [f"{k}.zarr" for k in slides]}).to_csv(manifest, index=False)
    return manifest


def _weights(root: Path, encoder: str) -> list[str]:
    if encoder != "test_resnet":
        return ["--encoder", encoder]
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "encoder.safetensors"))
    return ["--encoder", "test_resnet", "--encoder-weights", str(root / "encoder.safetensors")]


def _run(args: list[str]) -> tuple[float, float]:
    """(wall time of the process, time the run itself reports in run.json)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "spade_sc.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"spade-sc {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    return wall, json.loads((out / "run.json").read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--spots", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoder", default="test_resnet", help="test_resnet (tiny, fixed weights) or any encoder")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _cohort(root, opts.slides, opts.spots, opts.image_size)
        common = [*_weights(root, opts.encoder), "--threads", "1", "--quiet"]
        serial_wall, serial = _run(["features", str(manifest), "--out", str(root / "serial"), *common])
        dask_wall, dask = _run(
            ["features", str(manifest), "--out", str(root / "dask"), "--workers", str(opts.workers), *common]
        )
        rerun_wall, rerun = _run(["features", str(manifest), "--out", str(root / "serial"), *common])
    n = opts.slides
    print(f"{n} slides, {opts.spots} spots, {opts.image_size} px, encoder {opts.encoder}")
    print(
        f"C1 serial {serial:.1f} s ({serial_wall:.1f} s with start-up); --workers {opts.workers} {dask:.1f} s "
        f"({dask_wall:.1f} s)"
    )
    print(
        f"C1 speed-up serial / dask = {serial / dask:.2f} (ideal {opts.workers}); "
        f"Dask overhead per slide = {(dask * opts.workers - serial) / n:.2f} s"
    )
    print(f"C2 resume over a finished cohort: {rerun / n:.3f} s per slide ({rerun_wall / n:.2f} s with start-up)")


if __name__ == "__main__":
    main()
