"""The main job until `spade-sc demo` exists: load the data spade_sc works on and summarise it."""

import os
from pathlib import Path

import spade_sc as sp

cohort = sp.datasets.synthetic(n_slides=2, n_spots=100, image_size=1024)
for name, sdata in cohort.items():
    table = sdata.tables["table"]
    print(f"synthetic {name}: {table.n_obs} spots x {table.n_vars} genes, {sp.pp.pixel_size(sdata):.2f} um/px")

root = Path(os.environ.get("SPADE_SC_DATA", "../shared/data")) / "her2st"
if root.is_dir():
    for sid, sdata in sp.datasets.her2st(root).items():
        table = sdata.tables["table"]
        print(f"her2st {sid}: {table.n_obs} spots x {table.n_vars} genes, {sp.pp.pixel_size(sdata):.3f} um/px")
else:
    print(f"no her2st data at {root}; set SPADE_SC_DATA to the folder that holds her2st/")
