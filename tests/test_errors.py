"""Bad inputs everywhere: every error is the package's own, names its culprit, and leaves the input as it was.

Each case of ``CASES`` builds a call from small inputs (synthetic slides of 256 px, a tiny model folder, copies of
one her2st section with a small image, a tiny HEST folder, a copy of the tiny Visium folder, files written here),
snapshots what the call may touch (:func:`snapshot`: every element name, image pixels, shapes geometry, every
table's X / obs / var / obsm / layers / uns, attrs, transformations; folders by file hashes), and checks that the
call raises the expected exception type with a message naming the culprit (slide, file, key or argument), and that
the snapshot is unchanged afterwards. Warnings (log-normalised input, an all-NaN image) and the traps of a single id
(``validation_slides="slide0"``) and of ``inplace=False`` have tests of their own, as has the command line (exit 2,
one line naming the culprit, nothing written).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity, get_transformation
from torch import nn

import spade_sc as sp
from spade_sc.cli import main
from spade_sc.encoders import get_encoder

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FEATURES = "X_feat"  # random 8-d features of the synthetic spots (no encoder needed)
SPADE = "X_spade"
_COUNTS = "data/ST-cnts/B4.tsv.gz"  # the her2st section of the cases, laid out as in the public repository
_SPOTS = "data/ST-spotfiles/B4_selection.tsv"
_JPEG = "data/ST-imgs/B/B4/B4_HE.jpg"
DIM = 8


# ---------------------------------------------------------------------------------------------------------------------
# snapshots: what a failing call must leave as it was
# ---------------------------------------------------------------------------------------------------------------------
def _feed(h: Any, value: Any) -> None:
    """Feed a canonical description of ``value`` (containers, arrays, frames, dask arrays) into the hash ``h``."""
    if isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif sparse.issparse(value):
        m = sparse.csr_matrix(value)
        for part in (m.data, m.indices, m.indptr, np.asarray(m.shape)):
            _feed(h, np.asarray(part))
    elif hasattr(value, "dask") and hasattr(value, "name"):  # a dask array: its graph name changes with its data
        h.update(f"dask{value.name}{value.shape}{value.dtype}".encode())
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(repr(value.tolist()).encode() if value.dtype == object else np.ascontiguousarray(value).tobytes())
    elif isinstance(value, pd.DataFrame):
        h.update(repr((list(value.columns), [str(d) for d in value.dtypes], list(value.index))).encode())
        if len(value.columns):
            h.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
    elif isinstance(value, pd.Series | pd.Index):
        h.update(repr((str(value.dtype), value.tolist())).encode())
    elif hasattr(value, "numpy") and hasattr(value, "shape"):  # a torch tensor
        _feed(h, value.detach().cpu().numpy())
    else:
        h.update(repr(value).encode())


def _digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _image_snapshot(image: Any) -> dict[str, Any]:
    if hasattr(image, "children"):  # a multiscale DataTree
        arrays = {name: node["image"] for name, node in image.children.items()}
    else:
        arrays = {"scale0": image}
    out = {"transformations": repr(get_transformation(image, get_all=True))}
    for name, arr in arrays.items():
        out[name] = _digest([arr.data, list(arr.dims), {k: np.asarray(v) for k, v in arr.coords.items()}])
    return out


def _table_snapshot(table: ad.AnnData) -> str:
    parts = {
        "X": table.X,
        "obs": table.obs,
        "var": table.var,
        "obsm": dict(table.obsm),
        "layers": dict(table.layers),
        "obsp": dict(table.obsp),
        "uns": dict(table.uns),
    }
    return _digest(parts)


def snapshot(obj: Any) -> Any:
    """A comparable description of a SpatialData, a cohort of them, a folder or file (hashes), a model or a table."""
    if isinstance(obj, SpatialData):
        return {
            "names": {k: sorted(getattr(obj, k)) for k in ("images", "labels", "points", "shapes", "tables")},
            "images": {k: _image_snapshot(v) for k, v in obj.images.items()},
            "shapes": {
                k: _digest(
                    [list(v.geometry.to_wkb()), v.drop(columns="geometry"), repr(get_transformation(v, get_all=True))]
                )
                for k, v in obj.shapes.items()
            },
            "tables": {k: _table_snapshot(v) for k, v in obj.tables.items()},
            "attrs": _digest(dict(obj.attrs)),
        }
    if isinstance(obj, Mapping):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        if obj.is_file():
            return hashlib.sha256(obj.read_bytes()).hexdigest()
        if not obj.exists():
            return None
        return {str(p.relative_to(obj)): snapshot(p) if p.is_file() else "dir" for p in sorted(obj.rglob("*"))}
    if isinstance(obj, ad.AnnData):
        return _table_snapshot(obj)
    if isinstance(obj, sp.model.SpadeModel):
        return [obj.fingerprint(), _digest(obj.init_params_), obj.is_trained_, _digest(obj.train_params_)]
    if isinstance(obj, sp.model.MILModel):
        return _digest([obj.module.state_dict(), obj.features_key, obj.classes])
    if isinstance(obj, pd.DataFrame):
        return _digest(obj)
    msg = f"snapshot: cannot describe a {type(obj).__name__}"
    raise TypeError(msg)


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------
class _Mean(nn.Module):
    """Features = mean colour of the patch: an encoder that costs nothing."""

    def forward(self, x: Any) -> Any:
        return x.mean(dim=(2, 3))


def _copy(sdata: SpatialData) -> SpatialData:
    """A slide sharing images and shapes with ``sdata``, with copies of its tables and attrs."""
    out = SpatialData(
        images=dict(sdata.images), shapes=dict(sdata.shapes), tables={k: t.copy() for k, t in sdata.tables.items()}
    )
    out.attrs.update(copy.deepcopy(dict(sdata.attrs)))
    return out


def _image(values: np.ndarray, cs: str, c_coords: list[Any] | None = None) -> Any:
    return Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=c_coords, transformations={cs: Identity()})


def _replace(path: Path, data: bytes | str) -> None:
    """Replace a file (possibly a link to the shared data) by new content, never writing through the link."""
    path.unlink(missing_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    _replace(path, data[: int(len(data) * keep)])


def _edit_json(path: Path, edit: Callable[[dict], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    _replace(path, json.dumps(data))


def _link_tree(src: Path, dst: Path) -> Path:
    """``dst`` mirroring ``src`` with folders made and files linked (replace a file with :func:`_replace`)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p.resolve(), target)
    return dst


def _write_tif(path: Path, rgb: np.ndarray, mpp: float | None = 0.5) -> Path:
    import tifffile

    extra = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    photometric = "rgb" if rgb.ndim == 3 else "minisblack"
    tifffile.imwrite(path, rgb, photometric=photometric, metadata=None, **extra)
    return path


class Res:
    """The inputs of the cases, each built once per module when a case first needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ---------------------------------------------------------------- synthetic slides
    @cached_property
    def _spots(self) -> dict[str, SpatialData]:
        return sp.datasets.synthetic(n_slides=2, n_spots=40, image_size=256, n_genes=60, seed=0)

    def cohort(self, features: bool = True) -> dict[str, SpatialData]:
        """Fresh copies of two small synthetic slides with spots (and random 8-d features ``X_feat``)."""
        out = {}
        for i, (name, sdata) in enumerate(self._spots.items()):
            s = _copy(sdata)
            if features:
                t = s.tables["table"]
                t.obsm[FEATURES] = np.random.default_rng(i).normal(size=(t.n_obs, DIM)).astype(np.float32)
            out[name] = s
        return out

    @cached_property
    def _whole(self) -> dict[str, SpatialData]:
        return sp.datasets.synthetic(n_slides=2, image_size=256, spots=False, seed=1)

    def whole(self) -> dict[str, SpatialData]:
        """Fresh copies of two small synthetic whole slides (image only)."""
        return {name: _copy(s) for name, s in self._whole.items()}

    @cached_property
    def _tiled(self) -> dict[str, SpatialData]:
        slides = sp.datasets.synthetic(n_slides=4, image_size=256, spots=False, seed=2)
        for i, s in enumerate(slides.values()):
            sp.pp.tile_tissue(s, mpp=2.0, tile_size=16)
            t = s.tables["image_tiles_table"]
            t.obsm[SPADE] = np.random.default_rng(i).normal(size=(t.n_obs, DIM)).astype(np.float32)
        return slides

    def tiled(self) -> dict[str, SpatialData]:
        """Fresh copies of four tiled synthetic whole slides with random 8-d ``X_spade`` tile embeddings."""
        return {name: _copy(s) for name, s in self._tiled.items()}

    @cached_property
    def encoder(self) -> Any:
        return get_encoder(_Mean(), input_size=16, mean=(0, 0, 0), std=(1, 1, 1), name="mean", device="cpu")

    # ---------------------------------------------------------------- models
    @cached_property
    def _experts(self) -> Any:
        x = np.random.default_rng(0).normal(size=(64, DIM)).astype(np.float32)
        return sp.model.DataExperts.fit(x, n_clusters_per_tissue=2, n_experts=1)

    def untrained(self) -> Any:
        genes = [f"GENE{i:04d}" for i in range(10)]
        return sp.model.SpadeModel(self._experts, genes, DIM, features_key=FEATURES, proj_dim=4)

    @cached_property
    def model_dir(self) -> Path:
        rng = np.random.default_rng(1)
        model = self.untrained()
        x = rng.normal(size=(48, DIM)).astype(np.float32)
        y = rng.normal(size=(48, 10)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's notes on a one-batch training
            model.train({"a": (x, y, np.zeros(48, np.int64))}, max_epochs=1, batch_size=32, progress=False)
        return model.save(self.root / "spade_model")

    @cached_property
    def mil_dir(self) -> Path:
        return Path(__file__).parent / "data" / "mil_model_v0"  # 8-d X_spade, classes "a" / "b"

    def model_copy(self, tmp: Path, mil: bool = False) -> Path:
        return Path(shutil.copytree(self.mil_dir if mil else self.model_dir, tmp / "model"))

    # ---------------------------------------------------------------- real-data layouts
    @cached_property
    def data_root(self) -> Path:
        root = Path(os.environ.get("SPADE_SC_DATA", DEFAULT_DATA)).resolve()
        if not (root / "her2st").is_dir():
            pytest.skip(f"real data not found at {root} (set SPADE_SC_DATA)")
        return root

    @cached_property
    def _small_jpeg(self) -> Path:
        from PIL import Image

        path = self.root / "small.jpg"
        rgb = np.random.default_rng(0).integers(120, 250, (400, 360, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path, quality=90)
        return path

    @cached_property
    def _small_counts(self) -> Path:
        """Counts of 12 genes for the spots of B4's spot file (the real file has 15,000 genes: slow to parse)."""
        spots = pd.read_csv(self.data_root / "her2st" / _SPOTS, sep="\t")
        index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
        counts = np.random.default_rng(0).poisson(2, (len(spots), 12))
        frame = pd.DataFrame(counts, index=index, columns=[f"G{i}" for i in range(12)])
        path = self.root / "B4.tsv.gz"
        frame.to_csv(path, sep="\t", compression="gzip")
        return path

    def her2st(self, tmp: Path) -> Path:
        """A her2st layout of section B4: links to its shared files, small counts, a small JPEG for its H&E."""
        src = self.data_root / "her2st"
        root = tmp / "her2st"
        for rel in (_SPOTS, "res/ST-cluster/lbl/B4-cluster-annotation.tsv.gz", "res/ST-cluster/motivation.csv"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src / rel, root / rel)
        (root / _COUNTS).parent.mkdir(parents=True)
        shutil.copy(self._small_counts, root / _COUNTS)
        (root / _JPEG).parent.mkdir(parents=True)
        shutil.copy(self._small_jpeg, root / _JPEG)
        return root

    def visium(self, tmp: Path) -> Path:
        return _link_tree(self.data_root / "visium_heart_tiny", tmp / "visium")

    def hest(self, tmp: Path) -> Path:
        """A HEST-1k layout with one sample S1: a 256 px slide, 20 spots, metadata."""
        root = tmp / "hest"
        for d in ("st", "wsis", "metadata"):
            (root / d).mkdir(parents=True)
        rgb = np.random.default_rng(0).integers(100, 250, (256, 256, 3), dtype=np.uint8)
        _write_tif(root / "wsis" / "S1.tif", rgb)
        rng = np.random.default_rng(1)
        table = ad.AnnData(X=sparse.csr_matrix(rng.poisson(3, (20, 30)).astype(np.float32)))
        table.obs_names = [f"bc{i}" for i in range(20)]
        table.var_names = [f"G{i}" for i in range(30)]
        table.obsm["spatial"] = rng.uniform(20, 230, (20, 2))
        table.write_h5ad(root / "st" / "S1.h5ad")
        meta = {"pixel_size_um_estimated": 0.5, "spot_diameter": 55.0, "st_technology": "Visium", "organ": "Breast"}
        (root / "metadata" / "S1.json").write_text(json.dumps(meta))
        return root


@pytest.fixture(scope="module")
def res(tmp_path_factory, one_torch_thread) -> Res:
    return Res(tmp_path_factory.mktemp("errors"))


# ---------------------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------------------
Built = tuple[Callable[[], Any], list[Any]]


@dataclass(frozen=True)
class Case:
    """A bad input: ``build(res, tmp_path)`` gives the call and what it must not change."""

    id: str
    build: Callable[[Res, Path], Built]
    exc: type[BaseException]
    match: str


CASES: list[Case] = []


def case(id: str, exc: type[BaseException], match: str) -> Callable:
    def register(build: Callable[[Res, Path], Built]) -> Callable:
        CASES.append(Case(id, build, exc, match))
        return build

    return register


def _calls(prefix: str, func: Callable[..., Any], make: Callable[[Res, Path], Any], rows: list[tuple]) -> None:
    """Register argument cases ``(id, kwargs, exception, match)`` of ``func(input, **kwargs)``."""
    for id_, kwargs, exc, match in rows:

        def build(r: Res, tmp: Path, kwargs: dict = kwargs) -> Built:
            data = make(r, tmp)
            return (lambda: func(data, **kwargs)), [data]

        CASES.append(Case(f"{prefix}-{id_}", build, exc, match))


# ---- datasets.her2st: every file it opens ----------------------------------------------------------------------------
def _her2st_case(id_: str, exc: type[BaseException], match: str, corrupt: Callable[[Path], Any], **kwargs: Any):
    def build(r: Res, tmp: Path) -> Built:
        root = r.her2st(tmp)
        corrupt(root)
        return (lambda: sp.datasets.her2st(root, **kwargs)), [root]

    CASES.append(Case(f"her2st-{id_}", build, exc, match))


_her2st_case("counts-not-gzip", ValueError, r"'B4'.*counts file .*B4\.tsv\.gz", lambda r: _replace(r / _COUNTS, b"no"))
_her2st_case(
    "counts-empty", ValueError, r"counts file .*B4\.tsv\.gz", lambda r: _replace(r / _COUNTS, gzip.compress(b""))
)
_her2st_case("counts-truncated", ValueError, r"B4\.tsv\.gz", lambda r: _truncate(r / _COUNTS, 0.3))
_her2st_case(
    "counts-text",
    ValueError,
    r"B4\.tsv\.gz holds non-numeric values",
    lambda r: _replace(r / _COUNTS, gzip.compress(b"\tG1\tG2\n10x14\t1\tx\n")),
)
_her2st_case(
    "counts-negative",
    ValueError,
    r"B4\.tsv\.gz holds negative",
    lambda r: _replace(r / _COUNTS, gzip.compress(b"\tG1\tG2\n10x14\t1\t-2\n")),
)
_her2st_case(
    "counts-fractions",
    ValueError,
    r"B4\.tsv\.gz holds non-integer",
    lambda r: _replace(r / _COUNTS, gzip.compress(b"\tG1\tG2\n10x14\t1\t0.5\n")),
)
_her2st_case("spots-missing", FileNotFoundError, r"B4_selection\.tsv", lambda r: (r / _SPOTS).unlink())
_her2st_case(
    "spots-binary",
    ValueError,
    r"spot file .*B4_selection\.tsv",
    lambda r: _replace(r / _SPOTS, b"\xff\xfe\x00\x81" * 50),
)
_her2st_case(
    "spots-no-columns",
    ValueError,
    r"B4_selection\.tsv lacks the columns",
    lambda r: _replace(r / _SPOTS, "a\tb\n1\t2\n"),
)
_her2st_case(
    "spots-nan",
    ValueError,
    r"B4_selection\.tsv.*'B4'.*missing or non-numeric.*pixel_x",
    lambda r: _replace(r / _SPOTS, "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\n10\t14\t10\t14\t\t5\n9\t13\t9\t13\t2\t3\n"),
)
_her2st_case(
    "spots-disjoint",
    ValueError,
    r"B4_selection\.tsv shares no spot",
    lambda r: _replace(
        r / _SPOTS, "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\n99\t99\t99\t99\t1\t1\n98\t97\t98\t97\t5\t6\n"
    ),
)
_her2st_case("jpeg-truncated", ValueError, r"'B4'.*H&E image .*B4_HE\.jpg", lambda r: _truncate(r / _JPEG, 0.4))
_her2st_case("jpeg-not-an-image", ValueError, r"H&E image .*B4_HE\.jpg", lambda r: _replace(r / _JPEG, "not a jpeg"))
_her2st_case(
    "labels-corrupt",
    ValueError,
    r"region label file .*B4-cluster-annotation\.tsv\.gz",
    lambda r: _replace(r / "res/ST-cluster/lbl/B4-cluster-annotation.tsv.gz", b"\x1f\x8b garbage"),
)
_her2st_case(
    "motivation-binary",
    ValueError,
    r"motivation\.csv",
    lambda r: _replace(r / "res/ST-cluster/motivation.csv", b"\xff\xfe\xfa" * 30),
)
_her2st_case("unknown-section", ValueError, r"Unknown her2st section.*'Z9'", lambda r: None, sections="Z9")
_her2st_case("sections-int", TypeError, r"sections", lambda r: None, sections=5)
_her2st_case("sections-duplicated", ValueError, r"sections.*duplicated.*'B4'", lambda r: None, sections=["B4", "B4"])
_her2st_case(
    "no-layout", FileNotFoundError, r"missing .*ST-spotfiles", lambda r: shutil.rmtree(r / "data/ST-spotfiles")
)
_her2st_case(
    "no-image",
    FileNotFoundError,
    r"'B4'.*no H&E image",
    lambda r: (r / _JPEG).unlink(),
    sections=["B4"],
)


@case("her2st-root-missing", FileNotFoundError, r"nowhere")
def _(r: Res, tmp: Path) -> Built:
    return (lambda: sp.datasets.her2st(tmp / "nowhere")), [tmp]


# ---- datasets.synthetic: every argument ------------------------------------------------------------------------------
_calls(
    "synthetic",
    lambda _, **kw: sp.datasets.synthetic(**kw),
    lambda r, tmp: tmp,
    [
        ("n_slides-0", {"n_slides": 0}, ValueError, r"n_slides"),
        ("tissue-unknown", {"tissue_types": ["blob"]}, ValueError, r"'blob'"),
        ("tissue-duplicated", {"tissue_types": ["tumour", "tumour"]}, ValueError, r"tissue_types.*'tumour'"),
        ("image_size-small", {"image_size": 10}, ValueError, r"image_size"),
        ("seed-negative", {"seed": -1}, ValueError, r"seed"),
        ("organs-empty", {"organs": []}, ValueError, r"organ"),
        ("n_genes-text", {"n_genes": "many"}, ValueError, r"n_genes"),
        ("n_spots-float", {"n_spots": 2.5}, ValueError, r"n_spots"),
    ],
)


# ---- io.read_wsi: files and arguments --------------------------------------------------------------------------------
def _tif(r: Res, tmp: Path) -> Path:
    return _write_tif(tmp / "slide.tif", np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))


_calls(
    "read_wsi",
    lambda path, **kw: sp.io.read_wsi(path, **kw),
    _tif,
    [
        ("mpp-negative", {"mpp": -1}, ValueError, r"mpp"),
        ("backend", {"backend": "vips"}, ValueError, r"backend.*'vips'"),
        ("name-path", {"name": "a/b"}, ValueError, r"name='a/b'"),
        ("chunk_size", {"chunk_size": 3}, ValueError, r"chunk_size"),
    ],
)


@case("read_wsi-missing", FileNotFoundError, r"nope\.tif")
def _(r: Res, tmp: Path) -> Built:
    return (lambda: sp.io.read_wsi(tmp / "nope.tif")), [tmp]


@case("read_wsi-text", ValueError, r"slide\.tif")
def _(r: Res, tmp: Path) -> Built:
    _replace(tmp / "slide.tif", "not a slide")
    return (lambda: sp.io.read_wsi(tmp / "slide.tif", mpp=0.5)), [tmp]


@case("read_wsi-truncated", ValueError, r"slide\.tif .*truncated")
def _(r: Res, tmp: Path) -> Built:
    _truncate(_tif(r, tmp), 0.5)
    return (lambda: sp.io.read_wsi(tmp / "slide.tif")), [tmp]


@case("read_wsi-grey", ValueError, r"slide\.tif .*single-channel|slide\.tif has 1 channel")
def _(r: Res, tmp: Path) -> Built:
    _write_tif(tmp / "slide.tif", np.zeros((64, 64), np.uint8))
    return (lambda: sp.io.read_wsi(tmp / "slide.tif")), [tmp]


@case("read_wsi-no-pixel-size", ValueError, r"slide\.tif records no pixel size")
def _(r: Res, tmp: Path) -> Built:
    _write_tif(tmp / "slide.tif", np.zeros((64, 64, 3), np.uint8), mpp=None)
    return (lambda: sp.io.read_wsi(tmp / "slide.tif")), [tmp]


@case("read_wsi-folder", ValueError, r"is not a file")
def _(r: Res, tmp: Path) -> Built:
    (tmp / "slide.tif").mkdir()
    return (lambda: sp.io.read_wsi(tmp / "slide.tif")), [tmp]


# ---- io.read_hest: every file of a sample ----------------------------------------------------------------------------
def _hest_case(id_: str, exc: type[BaseException], match: str, corrupt: Callable[[Path], Any], **kwargs: Any):
    def build(r: Res, tmp: Path) -> Built:
        root = r.hest(tmp)
        corrupt(root)
        return (lambda: sp.io.read_hest(root, **kwargs)), [root]

    CASES.append(Case(f"read_hest-{id_}", build, exc, match))


_hest_case("metadata-broken", ValueError, r"metadata file .*S1\.json", lambda r: _replace(r / "metadata/S1.json", "{"))
_hest_case("metadata-list", ValueError, r"S1\.json holds a JSON list", lambda r: _replace(r / "metadata/S1.json", "[]"))
_hest_case(
    "metadata-no-pixel-size",
    ValueError,
    r"S1\.json has no pixel size",
    lambda r: _edit_json(r / "metadata/S1.json", lambda m: m.pop("pixel_size_um_estimated")),
)
_hest_case(
    "h5ad-garbage", ValueError, r"h5ad file .*S1\.h5ad cannot be read", lambda r: _replace(r / "st/S1.h5ad", b"x" * 64)
)
_hest_case("slide-garbage", ValueError, r"S1\.tif", lambda r: _replace(r / "wsis/S1.tif", b"II*\x00garbage"))
_hest_case("unknown-id", ValueError, r"Unknown HEST sample.*'S9'", lambda r: None, sample_ids="S9")
_hest_case("ids-int", TypeError, r"sample_ids", lambda r: None, sample_ids=3)
_hest_case(
    "filter-field", ValueError, r"metadata_filter fields \['colour'\]", lambda r: None, metadata_filter={"colour": "x"}
)
_hest_case("filter-type", TypeError, r"metadata_filter", lambda r: None, metadata_filter=5)
_hest_case("no-layout", FileNotFoundError, r"missing the folder.*'wsis'", lambda r: shutil.rmtree(r / "wsis"))


# ---- io.read_visium: every file of a Space Ranger folder -------------------------------------------------------------
def _visium_case(id_: str, exc: type[BaseException], match: str, corrupt: Callable[[Path], Any], **kwargs: Any):
    def build(r: Res, tmp: Path) -> Built:
        root = r.visium(tmp)
        corrupt(root)
        return (lambda: sp.io.read_visium(root, **kwargs)), [root]

    CASES.append(Case(f"read_visium-{id_}", build, exc, match))


_SCALE = "spatial/scalefactors_json.json"
_H5 = "filtered_feature_bc_matrix.h5"
_visium_case(
    "scalefactors-broken", ValueError, r"scale factors file .*scalefactors_json\.json", lambda r: _truncate(r / _SCALE)
)
_visium_case(
    "scalefactors-no-diameter",
    ValueError,
    r"scalefactors_json\.json has no positive 'spot_diameter_fullres'",
    lambda r: _edit_json(r / _SCALE, lambda f: f.update(spot_diameter_fullres=-3)),
)
_visium_case(
    "h5-garbage",
    ValueError,
    r"count matrix .*filtered_feature_bc_matrix\.h5",
    lambda r: _replace(r / _H5, b"junk" * 20),
)
_visium_case("h5-truncated", ValueError, r"filtered_feature_bc_matrix\.h5", lambda r: _truncate(r / _H5, 0.5))
_visium_case("h5-missing", FileNotFoundError, r"filtered_feature_bc_matrix\.h5", lambda r: (r / _H5).unlink())
_POS = "spatial/tissue_positions_list.csv"
_POS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _positions_with_header(root: Path, drop: list[str]) -> None:
    """Rewrite the positions as Space Ranger 2's ``tissue_positions.csv`` (with a header), without ``drop``."""
    frame = pd.read_csv(root / _POS, header=None, names=_POS_COLUMNS)
    (root / _POS).unlink()
    frame.drop(columns=drop).to_csv(root / "spatial/tissue_positions.csv", index=False)


def _positions_edit_first_spot(root: Path) -> None:
    """Replace the column pixel position of the count matrix's first spot by text."""
    import h5py

    with h5py.File(root / _H5, "r") as h5:
        first = h5["matrix"]["barcodes"][0].decode()
    lines = [
        f"{line.rsplit(',', 1)[0]},x" if line.startswith(first) else line
        for line in (root / _POS).read_text().splitlines()
    ]
    _replace(root / _POS, "\n".join(lines) + "\n")


def _positions_as_parquet(root: Path) -> None:
    frame = pd.read_csv(root / _POS, header=None, names=_POS_COLUMNS)
    (root / _POS).unlink()
    frame.to_parquet(root / "spatial/tissue_positions.parquet")


_visium_case(
    "positions-garbage",
    ValueError,
    r"tissue positions file .*tissue_positions_list\.csv lacks the columns",
    lambda r: _replace(r / _POS, "a,b\nc,d\n"),
)
_visium_case(
    "positions-empty", ValueError, r"tissue_positions_list\.csv cannot be read", lambda r: _replace(r / _POS, "")
)
_visium_case(
    "positions-truncated",
    ValueError,
    r"tissue_positions_list\.csv has no position for \d+ of the 100 spots",
    lambda r: _truncate(r / _POS, 0.5),
)
_visium_case(
    "positions-missing-column",
    ValueError,
    r"tissue_positions\.csv lacks the columns \['pxl_col_in_fullres'\]",
    lambda r: _positions_with_header(r, ["pxl_col_in_fullres"]),
)
_visium_case(
    "positions-not-a-number",
    ValueError,
    r"tissue_positions_list\.csv has no finite pixel position .* 1 spot",
    _positions_edit_first_spot,
)
_visium_case(
    "positions-duplicated",
    ValueError,
    r"tissue_positions_list\.csv lists the barcodes",
    lambda r: _replace(r / _POS, (r / _POS).read_text() * 2),
)
_visium_case("positions-missing", FileNotFoundError, r"tissue_positions_list\.csv", lambda r: (r / _POS).unlink())
_visium_case("positions-parquet-only", ValueError, r"tissue_positions\.parquet", _positions_as_parquet)
_visium_case(
    "positions-file-name",
    ValueError,
    r"tissue_positions_file='spatial/spots\.csv'",
    lambda r: None,
    tissue_positions_file="spatial/spots.csv",
)
_visium_case(
    "scalefactors-no-lowres",
    ValueError,
    r"scalefactors_json\.json has no positive 'tissue_lowres_scalef'",
    lambda r: _edit_json(r / _SCALE, lambda f: f.pop("tissue_lowres_scalef")),
)
_visium_case(
    "scalefactors-list", ValueError, r"scalefactors_json\.json holds a JSON list", lambda r: _replace(r / _SCALE, "[1]")
)
_visium_case("fullres-missing", FileNotFoundError, r"full\.tif", lambda r: None, fullres_image_file="full.tif")
_visium_case("dataset_id-path", ValueError, r"dataset_id='\.\./x'", lambda r: None, dataset_id="../x")


@case("read_visium-folder-missing", FileNotFoundError, r"nowhere")
def _(r: Res, tmp: Path) -> Built:
    return (lambda: sp.io.read_visium(tmp / "nowhere")), [tmp]


# ---- pp.image_features -----------------------------------------------------------------------------------------------
def _slide(r: Res, tmp: Path) -> SpatialData:
    return r.cohort()["slide0"]


def _features(sdata: SpatialData, r: Res | None = None, **kw: Any) -> Any:
    return sp.pp.image_features(sdata, encoder=kw.pop("encoder", "efficientnet_lite0"), progress=False, **kw)


_calls(
    "image_features",
    _features,
    _slide,
    [
        ("patch_size-small", {"patch_size": 8}, ValueError, r"patch_size"),
        ("mpp-zero", {"mpp": 0}, ValueError, r"mpp"),
        ("batch_size-zero", {"batch_size": 0}, ValueError, r"batch_size"),
        ("image_key-unknown", {"image_key": "he"}, KeyError, r"image_key='he'"),
        ("shapes_key-unknown", {"shapes_key": "cells"}, KeyError, r"shapes_key='cells'"),
        ("table_key-unknown", {"table_key": "counts"}, KeyError, r"'counts'"),
        ("key-exists", {"key_added": FEATURES}, ValueError, r"obsm\['X_feat'\] exists"),
        ("image_mpp-negative", {"image_mpp": -2.0}, ValueError, r"image_mpp"),
    ],
)


@case("image_features-two-channels", ValueError, r"Image 'image' has 2 channel")
def _(r: Res, tmp: Path) -> Built:
    s = _slide(r, tmp)
    s.images["image"] = _image(np.zeros((2, 256, 256), np.uint8), "slide0")
    return (lambda: _features(s, encoder=r.encoder)), [s]


@case("image_features-no-pixel-size", ValueError, r"pixel size of image 'image' is unknown")
def _(r: Res, tmp: Path) -> Built:
    s = _slide(r, tmp)
    s.attrs.clear()
    return (lambda: _features(s, encoder=r.encoder)), [s]


@case("image_features-spots-elsewhere", ValueError, r"No centre .*'spots' falls inside image 'image'")
def _(r: Res, tmp: Path) -> Built:
    s = _slide(r, tmp)
    s.images["image"] = _image(np.zeros((3, 16, 16), np.uint8), "slide0", ["r", "g", "b"])
    return (lambda: _features(s, encoder=r.encoder)), [s]


# ---- pp.gene_panel / gene_matrix -------------------------------------------------------------------------------------
@case("gene_panel-zero-counts", ValueError, r"Slide 'slide1'.*holds no counts")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide1"].tables["table"]
    t.X = t.X * 0  # stored zeros: 0 / 0 in scanpy's normalisation
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


@case("gene_panel-no-spot", ValueError, r"Slide 'slide1'.*holds no spot")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    c["slide1"] = SpatialData(
        tables={"table": ad.AnnData(X=np.zeros((0, 60), np.float32), var=c["slide0"].tables["table"].var.copy())}
    )
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


@case("gene_panel-nan", ValueError, r"Slide 'slide0'.*NaN")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide0"].tables["table"]
    x = t.X.toarray().astype(np.float32)
    x[0, 0] = np.nan
    t.X = sparse.csr_matrix(x)
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


@case("gene_panel-negative", ValueError, r"Slide 'slide1'.*negative")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide1"].tables["table"]
    x = t.X.toarray()
    x[1, 1] = -3
    t.X = sparse.csr_matrix(x)
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


@case("gene_panel-duplicated-genes", ValueError, r"Slide 'slide0'.*duplicated gene names.*'GENE0000'")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide0"].tables["table"]
    t.var_names = ["GENE0000"] * 2 + list(t.var_names[2:])
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


@case("gene_panel-log-for-seurat_v3", ValueError, r"Slide 'slide0'.*log-normalised.*seurat_v3")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide0"].tables["table"]
    t.X = sparse.csr_matrix(np.log1p(t.X.toarray().astype(np.float32)))
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10, flavor="seurat_v3")), [c]


@case("gene_panel-no-shared-gene", ValueError, r"share no gene")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    t = c["slide1"].tables["table"]
    t.var_names = [f"other{i}" for i in range(t.n_vars)]
    return (lambda: sp.pp.gene_panel(c, n_top_genes=10)), [c]


_calls(
    "gene_panel",
    lambda c, **kw: sp.pp.gene_panel(c, **kw),
    lambda r, tmp: r.cohort(features=False),
    [
        ("n_top_genes-0", {"n_top_genes": 0}, ValueError, r"n_top_genes"),
        ("layer-missing", {"layer": "raw"}, KeyError, r"Slide 'slide0'.*no layer 'raw'"),
        ("table_key-unknown", {"table_key": "cells"}, KeyError, r"'cells'"),
    ],
)


@case("gene_panel-empty-cohort", ValueError, r"cohort is empty")
def _(r: Res, tmp: Path) -> Built:
    return (lambda: sp.pp.gene_panel({})), []


@case("gene_panel-not-a-slide", TypeError, r"'b' is a DataFrame")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    bad = {"a": c["slide0"], "b": pd.DataFrame()}
    return (lambda: sp.pp.gene_panel(bad)), [c]


def _table(r: Res, tmp: Path) -> ad.AnnData:
    return r.cohort(features=False)["slide0"].tables["table"]


_calls(
    "gene_matrix",
    lambda t, **kw: sp.pp.gene_matrix(t, **kw),
    _table,
    [
        ("genes-string", {"genes": "GENE0001"}, TypeError, r"genes must be a sequence"),
        ("genes-missing", {"genes": ["GENE0001", "NOPE"]}, KeyError, r"'NOPE'"),
        ("genes-duplicated", {"genes": ["GENE0001", "GENE0001"]}, ValueError, r"'GENE0001'"),
        ("genes-empty", {"genes": []}, ValueError, r"genes is empty"),
        ("gene_input", {"genes": ["GENE0001"], "gene_input": "raw"}, ValueError, r"gene_input='raw'"),
    ],
)


@case("gene_matrix-log-as-counts", ValueError, r"log-normalised.*gene_input=\"counts\"")
def _(r: Res, tmp: Path) -> Built:
    t = _table(r, tmp)
    t.X = sparse.csr_matrix(np.log1p(t.X.toarray().astype(np.float32)))
    return (lambda: sp.pp.gene_matrix(t, ["GENE0001"], gene_input="counts")), [t]


# ---- pp.tile_tissue --------------------------------------------------------------------------------------------------
def _whole(r: Res, tmp: Path) -> SpatialData:
    return r.whole()["slide0"]


_calls(
    "tile_tissue",
    lambda s, **kw: sp.pp.tile_tissue(s, **kw),
    _whole,
    [
        ("tile_size-small", {"tile_size": 4}, ValueError, r"tile_size"),
        ("overlap-too-large", {"tile_size": 32, "overlap": 32}, ValueError, r"overlap"),
        ("min_tissue-2", {"min_tissue": 2}, ValueError, r"min_tissue"),
        ("mpp-negative", {"mpp": -0.5}, ValueError, r"mpp"),
        ("image_key-unknown", {"image_key": "he"}, KeyError, r"image_key='he'"),
        ("key_added-path", {"key_added": "../tiles", "mpp": 2.0, "tile_size": 32}, ValueError, r"'\.\./tiles'"),
    ],
)


@case("tile_tissue-blank", ValueError, r"No tile of image 'image'")
def _(r: Res, tmp: Path) -> Built:
    s = _whole(r, tmp)
    s.images["image"] = _image(np.full((3, 256, 256), 245, np.uint8), "slide0", ["r", "g", "b"])
    return (lambda: sp.pp.tile_tissue(s, mpp=2.0, tile_size=32)), [s]


@case("tile_tissue-exists", ValueError, r"shapes\['image_tiles'\].*already exist")
def _(r: Res, tmp: Path) -> Built:
    s = r.tiled()["slide0"]
    return (lambda: sp.pp.tile_tissue(s, mpp=2.0, tile_size=16)), [s]


@case("tile_tissue-two-channels", ValueError, r"Image 'image' has 2 channel")
def _(r: Res, tmp: Path) -> Built:
    s = _whole(r, tmp)
    s.images["image"] = _image(np.zeros((2, 256, 256), np.uint8), "slide0")
    return (lambda: sp.pp.tile_tissue(s, mpp=2.0, tile_size=32)), [s]


# ---- tl.build_experts ------------------------------------------------------------------------------------------------
@case("build_experts-features-missing", KeyError, r"Slide 'slide1'.*obsm\['X_feat'\] is missing")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort()
    del c["slide1"].tables["table"].obsm[FEATURES]
    return (lambda: sp.tl.build_experts(c, features_key=FEATURES, n_experts=2, n_clusters_per_tissue=4)), [c]


@case("build_experts-dimensions", ValueError, r"different dimensions across slides.*'slide1': 3")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort()
    c["slide1"].tables["table"].obsm[FEATURES] = np.zeros((c["slide1"].tables["table"].n_obs, 3), np.float32)
    return (lambda: sp.tl.build_experts(c, features_key=FEATURES, n_experts=2, n_clusters_per_tissue=4)), [c]


@case("build_experts-nan", ValueError, r"Slide 'slide0'.*NaN or infinite")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort()
    c["slide0"].tables["table"].obsm[FEATURES][3, 0] = np.nan
    return (lambda: sp.tl.build_experts(c, features_key=FEATURES, n_experts=2, n_clusters_per_tissue=4)), [c]


_calls(
    "build_experts",
    lambda c, **kw: sp.tl.build_experts(c, features_key=FEATURES, **kw),
    lambda r, tmp: r.cohort(),
    [
        ("too-many-experts", {"n_experts": 50, "n_clusters_per_tissue": 2}, ValueError, r"n_experts=50 exceeds"),
        ("tissue_key-unknown", {"tissue_key": "organ_type"}, KeyError, r"tissue_key='organ_type'"),
        ("n_experts-0", {"n_experts": 0}, ValueError, r"n_experts"),
        ("minibatch-negative", {"minibatch_threshold": -1}, ValueError, r"minibatch_threshold"),
    ],
)


# ---- tl.fit ----------------------------------------------------------------------------------------------------------
FIT = {
    "features_key": FEATURES,
    "n_top_genes": 10,
    "n_experts": 1,
    "max_epochs": 1,
    "batch_size": 64,
    "progress": False,
}


def _fit(c: Any, **kw: Any) -> Any:
    return sp.tl.fit(c, **{**FIT, **kw})


_calls(
    "fit",
    _fit,
    lambda r, tmp: r.cohort(),
    [
        ("validation-unknown", {"validation_slides": ["slide9"]}, ValueError, r"validation_slides.*'slide9'"),
        ("validation-all", {"validation_slides": ["slide0", "slide1"]}, ValueError, r"leaves no slide to train"),
        ("validation_fraction", {"validation_fraction": 1.5}, ValueError, r"validation_fraction"),
        ("gene_input", {"gene_input": "raw"}, ValueError, r"gene_input='raw'"),
        ("loss", {"loss": "mse"}, ValueError, r"loss='mse'"),
        ("routing", {"routing": "random"}, ValueError, r"routing='random'"),
        ("key_added-routing", {"key_added": "spade_routing"}, ValueError, r"key_added='spade_routing'"),
        ("model_kwargs", {"model_kwargs": {"depth": 3}}, ValueError, r"model_kwargs \['depth'\]"),
        ("n_experts-0", {"n_experts": 0}, ValueError, r"n_experts"),
        ("n_top_genes-0", {"n_top_genes": 0}, ValueError, r"n_top_genes"),
    ],
)


@case("fit-one-spot", ValueError, r"Too few training pairs.*at least 2")
def _(r: Res, tmp: Path) -> Built:
    s = r.cohort()["slide0"]
    t = s.tables["table"]
    s.tables["table"] = t[:1].copy()
    return (lambda: _fit(s)), [s]


@case("fit-zero-counts", ValueError, r"Slide 'slide1'.*holds no counts")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort()
    c["slide1"].tables["table"].X = c["slide1"].tables["table"].X * 0
    return (lambda: _fit(c)), [c]


@case("fit-features-nan", ValueError, r"Slide 'slide1'.*NaN or infinite")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort()
    c["slide1"].tables["table"].obsm[FEATURES][:] = np.nan
    return (lambda: _fit(c)), [c]


@case("fit-second-slide-two-channels", ValueError, r"Slide 'slide1'.*2 channel")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)  # features are computed on every slide: the second one cannot be read
    c["slide1"].images["image"] = _image(np.zeros((2, 256, 256), np.uint8), "slide1")
    return (lambda: _fit(c, features_key=None, encoder=r.encoder)), [c]


@case("fit-second-slide-no-pixel-size", ValueError, r"Slide 'slide1'.*pixel size")
def _(r: Res, tmp: Path) -> Built:
    c = r.cohort(features=False)
    c["slide1"].attrs.clear()
    return (lambda: _fit(c, features_key=None, encoder=r.encoder)), [c]


# ---- tl.evaluate: every slide checked before any fold trains ---------------------------------------------------------
#: A small evaluation: one-epoch single-expert SPADE, 5 target genes, no few-shot rows.
EVAL = {
    "features_key": FEATURES,
    "fit_kwargs": {"n_top_genes": 10, "n_experts": 1, "max_epochs": 1, "batch_size": 64, "validation_fraction": 0},
    "n_genes": 5,
    "shots": (),
    "gene_shots": (),
    "n_draws": 1,
    "pca": (False,),
    "n_pca": 4,
    "retrieval_k": 3,
    "projection_dim": 4,
    "progress": False,
}


def _evaluate(c: Any, **kw: Any) -> Any:
    return sp.tl.evaluate(c, **{**EVAL, **kw})


def _eval_cohort(r: Res, tmp: Path) -> dict[str, SpatialData]:
    c = r.cohort()
    for i, s in enumerate(c.values()):
        s.tables["table"].obs["cluster"] = pd.Categorical(np.where(np.arange(s.tables["table"].n_obs) % 2, "a", "b"))
        s.tables["table"].obs["patient"] = f"p{i}"
    return c


_calls(
    "evaluate",
    _evaluate,
    _eval_cohort,
    [
        ("features-missing", {"features_key": "X_uni"}, KeyError, r"Slide 'slide0'.*obsm\['X_uni'\] is missing"),
        ("label_key-unknown", {"label_key": "grade"}, KeyError, r"Slide 'slide0'.*obs\['grade'\] is missing"),
        (
            "label_group_key-unknown",
            {"label_key": "cluster", "label_group_key": "donor"},
            KeyError,
            r"Slide 'slide0'.*obs\['donor'\] is missing",
        ),
        ("representation-unknown", {"representations": ["base", "X_nope"]}, ValueError, r"Representation 'X_nope'"),
        ("folds-unknown", {"folds": [["slide9"]]}, ValueError, r"Fold 'slide9'.*\['slide9'\]"),
        ("folds-one-unknown-id", {"folds": "slide9"}, ValueError, r"Fold 'slide9'.*\['slide9'\]"),
        ("folds-all-slides", {"folds": [["slide0", "slide1"]]}, ValueError, r"leaves no slide to train on"),
        ("fit_kwargs-unknown", {"fit_kwargs": {"depth": 3}}, ValueError, r"fit_kwargs \['depth'\]"),
        (
            "fit_kwargs-unknown-no-spade",
            {"fit_kwargs": {"depth": 3}, "representations": ["base"]},
            ValueError,
            r"fit_kwargs \['depth'\]",
        ),
        ("fit_kwargs-reserved", {"fit_kwargs": {"key_added": "x"}}, ValueError, r"fit_kwargs may not set 'key_added'"),
        ("fit_kwargs-type", {"fit_kwargs": ["n_experts"]}, TypeError, r"fit_kwargs must be a mapping"),
        ("fit_kwargs-value", {"fit_kwargs": {**EVAL["fit_kwargs"], "n_experts": 0}}, ValueError, r"n_experts"),
        ("tasks-unknown", {"tasks": ["segmentation"]}, ValueError, r"tasks='segmentation'"),
        ("table_key-unknown", {"table_key": "spots"}, KeyError, r"table_key='spots'"),
        ("n_genes-0", {"n_genes": 0}, ValueError, r"n_genes"),
    ],
)


def _evaluate_case(id_: str, exc: type[BaseException], match: str, corrupt: Callable[[dict], Any]) -> None:
    def build(r: Res, tmp: Path) -> Built:
        c = _eval_cohort(r, tmp)
        corrupt(c)
        return (lambda: _evaluate(c)), [c]

    CASES.append(Case(f"evaluate-{id_}", build, exc, match))


def _scale_counts(c: dict, sid: str, factor: float, first: float | None = None) -> None:
    t = c[sid].tables["table"]
    x = t.X.toarray().astype(np.float32) * factor
    if first is not None:
        x[0, 0] = first
    t.X = sparse.csr_matrix(x)


def _drop_obsm(c: dict, sid: str) -> None:
    del c[sid].tables["table"].obsm[FEATURES]


def _nan_features(c: dict, sid: str) -> None:
    c[sid].tables["table"].obsm[FEATURES][:3] = np.nan


#: Corruptions of one slide that evaluate must refuse before the first fold trains (slide0 is the first held out).
EVALUATE_CORRUPTIONS: dict[str, tuple[type[BaseException], str, Callable[[dict], Any]]] = {
    "features-missing-second": (
        KeyError,
        r"Slide 'slide1'.*obsm\['X_feat'\] is missing",
        lambda c: _drop_obsm(c, "slide1"),
    ),
    "features-nan-second": (ValueError, r"Slide 'slide1'.*NaN or infinite", lambda c: _nan_features(c, "slide1")),
    "zero-counts-held-out": (ValueError, r"Slide 'slide0'.*holds no counts", lambda c: _scale_counts(c, "slide0", 0)),
    "zero-counts-second": (ValueError, r"Slide 'slide1'.*holds no counts", lambda c: _scale_counts(c, "slide1", 0)),
    "negative-counts-held-out": (
        ValueError,
        r"Slide 'slide0'.*1 negative count",
        lambda c: _scale_counts(c, "slide0", 1, first=-1),
    ),
    "nan-counts-second": (
        ValueError,
        r"Slide 'slide1'.*NaN or infinite count",
        lambda c: _scale_counts(c, "slide1", 1, first=np.nan),
    ),
}
for _id, (_exc, _match, _corrupt) in EVALUATE_CORRUPTIONS.items():
    _evaluate_case(_id, _exc, _match, _corrupt)


# ---- tl.embed --------------------------------------------------------------------------------------------------------
@case("embed-untrained", ValueError, r"untrained")
def _(r: Res, tmp: Path) -> Built:
    s, model = r.cohort()["slide0"], r.untrained()
    return (lambda: sp.tl.embed(s, model, progress=False)), [s, model]


@case("embed-dimension", ValueError, r"obsm\['X_feat'\] has shape \(\d+, 3\).*8-d")
def _(r: Res, tmp: Path) -> Built:
    s, model = r.cohort()["slide0"], sp.model.SpadeModel.load(r.model_dir)
    s.tables["table"].obsm[FEATURES] = np.zeros((s.tables["table"].n_obs, 3), np.float32)
    return (lambda: sp.tl.embed(s, model, progress=False)), [s, model]


def _embed_case(id_: str, kwargs: dict[str, Any], exc: type[BaseException], match: str) -> None:
    def build(r: Res, tmp: Path) -> Built:
        s, model = r.cohort()["slide0"], sp.model.SpadeModel.load(r.model_dir)
        return (lambda: sp.tl.embed(s, model, progress=False, **kwargs)), [s, model]

    CASES.append(Case(f"embed-{id_}", build, exc, match))


_embed_case("features_key-other", {"features_key": "X_uni"}, ValueError, r"features_key='X_uni'")
_embed_case("routing", {"routing": "random"}, ValueError, r"routing='random'")
_embed_case("table_key-unknown", {"table_key": "cells"}, KeyError, r"'cells'")


# ---- model folders: every file and every field -----------------------------------------------------------------------
def _load_case(id_: str, exc: type[BaseException], match: str, corrupt: Callable[[Path], Any], mil: bool = False):
    def build(r: Res, tmp: Path) -> Built:
        folder = r.model_copy(tmp, mil=mil)
        corrupt(folder)
        cls = sp.model.MILModel if mil else sp.model.SpadeModel
        return (lambda: cls.load(folder)), [folder]

    CASES.append(Case(f"{'mil' if mil else 'spade'}_load-{id_}", build, exc, match))


def _cfg(edit: Callable[[dict], Any]) -> Callable[[Path], Any]:
    return lambda folder: _edit_json(folder / "config.json", edit)


_CONFIG, _WEIGHTS = r"config\.json", r"model\.safetensors"
for _mil in (False, True):
    _load_case(
        "config-truncated", ValueError, rf"model config .*{_CONFIG}", lambda f: _truncate(f / "config.json"), _mil
    )
    _load_case(
        "config-list", ValueError, rf"{_CONFIG} holds a JSON list", lambda f: _replace(f / "config.json", "[1]"), _mil
    )
    _load_case("config-binary", ValueError, rf"{_CONFIG}", lambda f: _replace(f / "config.json", b"\xff\xfe\x00"), _mil)
    _load_case(
        "weights-truncated",
        ValueError,
        rf"weights file .*{_WEIGHTS}",
        lambda f: _truncate(f / "model.safetensors"),
        _mil,
    )
    _load_case(
        "weights-text", ValueError, rf"{_WEIGHTS}", lambda f: _replace(f / "model.safetensors", "no tensors"), _mil
    )
    _load_case(
        "weights-missing",
        FileNotFoundError,
        r"lacks model\.safetensors",
        lambda f: (f / "model.safetensors").unlink(),
        _mil,
    )
    _load_case("format-version", ValueError, r"format_version 99", _cfg(lambda c: c.update(format_version=99)), _mil)
    _load_case("class", ValueError, r"not a (SpadeModel|MILModel)", _cfg(lambda c: c.update({"class": "Other"})), _mil)
    _load_case(
        "init_params-missing", ValueError, rf"{_CONFIG}.*'init_params'", _cfg(lambda c: c.pop("init_params")), _mil
    )
    _load_case(
        "features_key-path",
        ValueError,
        r"features_key.*'\.\./\.\./\.\./pwn' is not a valid key name",
        _cfg(lambda c: (c["init_params"] if "genes" in c else c).update(features_key="../../../pwn")),
        _mil,
    )
    _load_case(
        "dropout-text",
        ValueError,
        r"init_params\['dropout'\]",
        _cfg(lambda c: c["init_params"].update(dropout="x")),
        _mil,
    )
for _key in ("genes", "data_experts", "encoder"):
    _load_case(f"{_key}-missing", ValueError, rf"{_CONFIG}.*\['{_key}'\]", _cfg(lambda c, k=_key: c.pop(k)))
for _key in ("proj_dim", "image_dim", "routing_tau", "seed", "dropout", "gene_input"):
    _load_case(
        f"init_params-{_key}-missing",
        ValueError,
        rf"init_params lacks .*'{_key}'",
        _cfg(lambda c, k=_key: c["init_params"].pop(k)),
    )
_load_case(
    "gene_dim",
    ValueError,
    r"genes lists 5 genes but init_params\['gene_dim'\] is 10",
    _cfg(lambda c: c.update(genes=c["genes"][:5])),
)
_load_case(
    "genes-duplicated",
    ValueError,
    r"genes holds duplicated names",
    _cfg(lambda c: c["genes"].__setitem__(1, c["genes"][0])),
)
_load_case(
    "routing",
    ValueError,
    r"init_params\['routing'\] is 'best'",
    _cfg(lambda c: c["init_params"].update(routing="best")),
)
_load_case("n_experts", ValueError, r"n_experts", _cfg(lambda c: c["init_params"].update(n_experts=3)))
_load_case(
    "centroids",
    ValueError,
    r"data_experts\.centroids",
    _cfg(lambda c: c["data_experts"].update(centroid_tissue=["all"] * 9)),
)
_load_case(
    "encoder-name",
    ValueError,
    r"encoder\['name'\]='\.\./x'",
    _cfg(lambda c: c.update(encoder={"name": "../x", "kind": "timm"})),
)
_load_case("fingerprint", ValueError, r"fingerprint", _cfg(lambda c: c.update(fingerprint="0" * 64)))
_load_case("task", ValueError, r"task.*'regression'", _cfg(lambda c: c.update(task="regression")), mil=True)
_load_case(
    "hidden-missing",
    ValueError,
    r"init_params lacks .*'hidden'",
    _cfg(lambda c: c["init_params"].pop("hidden")),
    mil=True,
)
_load_case("classes", ValueError, r"n_classes", _cfg(lambda c: c["init_params"].update(n_classes=5)), mil=True)
_load_case("one-class", ValueError, r"classes", _cfg(lambda c: c.update(classes=["a"])), mil=True)
_load_case(
    "standardisation-missing",
    ValueError,
    r"feature_mean",
    lambda f: _cfg(lambda c: c.update(standardised=True))(f) or _strip_tensors(f, "feature_"),
    mil=True,
)


def _strip_tensors(folder: Path, prefix: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith(prefix)}
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))


@case("spade_load-folder-missing", FileNotFoundError, r"nowhere")
def _(r: Res, tmp: Path) -> Built:
    return (lambda: sp.model.SpadeModel.load(tmp / "nowhere")), [tmp]


@case("spade_load-other-genes", ValueError, r"gene panel stored in .* differs")
def _(r: Res, tmp: Path) -> Built:
    folder = r.model_copy(tmp)
    return (lambda: sp.model.SpadeModel.load(folder, genes=["A", "B"])), [folder]


# ---- tl.slide_embeddings: all or nothing -----------------------------------------------------------------------------
def _slides(c: Any, r: Res, **kw: Any) -> Any:
    kw.setdefault("encoder", r.encoder)
    kw.setdefault("tile_kwargs", {"mpp": 2.0, "tile_size": 32})
    return sp.tl.slide_embeddings(c, progress=False, **kw)


@case("slide_embeddings-second-two-channels", ValueError, r"Slide 'slide1'.*2 channel")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    c["slide1"].images["image"] = _image(np.zeros((2, 256, 256), np.uint8), "slide1")
    return (lambda: _slides(c, r)), [c]


@case("slide_embeddings-second-blank", ValueError, r"Slide 'slide1'.*No tile of image 'image'")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    c["slide1"].images["image"] = _image(np.full((3, 256, 256), 245, np.uint8), "slide1", ["r", "g", "b"])
    return (lambda: _slides(c, r)), [c]


@case("slide_embeddings-second-no-pixel-size", ValueError, r"Slide 'slide1'.*pixel size")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    c["slide1"].attrs.clear()
    return (lambda: _slides(c, r)), [c]


@case("slide_embeddings-untrained", ValueError, r"untrained")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    return (lambda: _slides(c, r, encoder=None, model=r.untrained())), [c]


@case("slide_embeddings-model-and-encoder", ValueError, r"either model= .* or encoder=")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    return (lambda: _slides(c, r, model=sp.model.SpadeModel.load(r.model_dir))), [c]


@case("slide_embeddings-nothing-to-embed", ValueError, r"Slide 'slide0' has no tiles yet, and there is nothing")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    return (lambda: _slides(c, r, encoder=None)), [c]


@case("slide_embeddings-tiles-false", KeyError, r"Slide 'slide0' has no tiles")
def _(r: Res, tmp: Path) -> Built:
    c = r.whole()
    return (lambda: _slides(c, r, tiles=False)), [c]


@case("slide_embeddings-key_added-tiles-table", ValueError, r"key_added='image_tiles_table'")
def _(r: Res, tmp: Path) -> Built:
    c = r.tiled()
    return (lambda: _slides(c, r, encoder=None, features_key=SPADE, key_added="image_tiles_table")), [c]


@case("slide_embeddings-labels-unknown", ValueError, r"not in the cohort: \['slide9'\]")
def _(r: Res, tmp: Path) -> Built:
    c = r.tiled()
    labels = pd.DataFrame({"y": [1]}, index=["slide9"])
    return (lambda: _slides(c, r, encoder=None, features_key=SPADE, labels=labels)), [c]


@case("slide_embeddings-features-dimensions", ValueError, r"different dimensions across slides")
def _(r: Res, tmp: Path) -> Built:
    c = r.tiled()
    t = c["slide2"].tables["image_tiles_table"]
    t.obsm[SPADE] = np.zeros((t.n_obs, 3), np.float32)
    return (lambda: _slides(c, r, encoder=None, features_key=SPADE)), [c]


# ---- MIL: train_mil, attention ---------------------------------------------------------------------------------------
def _mil(c: Any, **kw: Any) -> Any:
    return sp.tl.train_mil(c, **{"label_key": "label", "folds": 2, "max_epochs": 1, **kw})


_calls(
    "train_mil",
    _mil,
    lambda r, tmp: r.tiled(),
    [
        ("label_key-none", {"label_key": None}, ValueError, r"label_key"),
        ("label_key-unknown", {"label_key": "grade"}, KeyError, r"\['grade'\]"),
        ("folds-1", {"folds": 1}, ValueError, r"folds"),
        ("task", {"task": "regression"}, ValueError, r"task='regression'"),
        ("survival-no-event", {"task": "survival", "time_key": "tumour_fraction"}, ValueError, r"event_key=None"),
        ("dropout-1", {"dropout": 1.0}, ValueError, r"dropout"),
        ("features-missing", {"features_key": "X_uni"}, KeyError, r"Slide 'slide0'.*obsm\['X_uni'\] is missing"),
        ("labels-type", {"labels": [1, 0]}, TypeError, r"labels must be a pandas DataFrame"),
    ],
)


@case("train_mil-one-class", ValueError, r"single class")
def _(r: Res, tmp: Path) -> Built:
    c = r.tiled()
    labels = pd.DataFrame({"label": ["a"] * 4}, index=list(c))
    return (lambda: _mil(c, labels=labels)), [c]


@case("attention-dimension", ValueError, r"Tiles table 'image_tiles_table'.*3-d features, but the MIL model takes 8-d")
def _(r: Res, tmp: Path) -> Built:
    s, model = r.tiled()["slide0"], sp.model.MILModel.load(r.mil_dir)
    t = s.tables["image_tiles_table"]
    t.obsm[SPADE] = np.zeros((t.n_obs, 3), np.float32)
    return (lambda: sp.tl.attention(s, model)), [s, model]


@case("attention-not-a-model", TypeError, r"mil_model must be a MILModel")
def _(r: Res, tmp: Path) -> Built:
    s = r.tiled()["slide0"]
    return (lambda: sp.tl.attention(s, r.untrained())), [s]


@case("attention-no-tiles", KeyError, r"has no tiles")
def _(r: Res, tmp: Path) -> Built:
    s, model = r.whole()["slide0"], sp.model.MILModel.load(r.mil_dir)
    return (lambda: sp.tl.attention(s, model)), [s, model]


# ---- pl --------------------------------------------------------------------------------------------------------------
@case("pl_attention-not-computed", KeyError, r"spade_sc\.tl\.attention")
def _(r: Res, tmp: Path) -> Built:
    s = r.tiled()["slide0"]
    return (lambda: sp.pl.attention(s, show=False)), [s]


@case("pl_top_patches-not-computed", KeyError, r"spade_sc\.tl\.attention")
def _(r: Res, tmp: Path) -> Built:
    s = r.tiled()["slide0"]
    return (lambda: sp.pl.top_patches(s, show=False)), [s]


@case("pl_elbow-columns", ValueError, r"lacks the columns \['wcss'\]")
def _(r: Res, tmp: Path) -> Built:
    df = pd.DataFrame({"step": ["tissue"], "tissue": ["all"], "k": [4]})
    return (lambda: sp.pl.elbow(df, show=False)), [df]


@case("pl_experts-not-computed", KeyError, r"spade_expert")
def _(r: Res, tmp: Path) -> Built:
    s = r.cohort()["slide0"]
    return (lambda: sp.pl.experts(s, show=False)), [s]


# ---------------------------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_culprit_and_changes_nothing(bad: Case, res: Res, tmp_path: Path):
    call, watched = bad.build(res, tmp_path)
    before = [snapshot(w) for w in watched]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expected warnings of the inputs (e.g. few spots per tissue)
        with pytest.raises(bad.exc, match=bad.match) as info:
            call()
    assert type(info.value).__module__.split(".")[0] in ("builtins", "spade_sc"), repr(info.value)
    assert [snapshot(w) for w in watched] == before, f"{bad.id} changed its input"


def test_there_are_enough_cases():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------------------------
# warnings, single ids, inplace=False, determinism record
# ---------------------------------------------------------------------------------------------------------------------
def test_log_normalised_counts_are_warned_about(res):
    c = res.cohort(features=False)
    t = c["slide1"].tables["table"]
    t.X = sparse.csr_matrix(np.log1p(t.X.toarray().astype(np.float32)))
    with pytest.warns(UserWarning, match=r"Slide 'slide1'.*log-normalised"):
        sp.pp.gene_panel(c, n_top_genes=10, inplace=False)
    with pytest.warns(UserWarning, match=r"log-normalised"):
        sp.pp.gene_matrix(t, ["GENE0001"])


def test_all_nan_image_is_warned_about(res):
    s = res.cohort()["slide0"]
    s.images["image"] = _image(np.full((3, 256, 256), np.nan, np.float32), "slide0", ["r", "g", "b"])
    with pytest.warns(UserWarning, match=r"Image 'image' holds only NaN"):
        sp.pp.image_features(s, encoder=res.encoder, inplace=False, progress=False)


def test_inplace_false_ignores_an_existing_key(res):
    s = res.cohort()["slide0"]
    before = snapshot(s)
    out = sp.pp.image_features(s, encoder=res.encoder, key_added=FEATURES, inplace=False, progress=False)
    assert out.shape == (s.tables["table"].n_obs, 3)
    assert snapshot(s) == before


def test_single_validation_slide_id_and_thread_record(res):
    import torch

    c = res.cohort()
    model = _fit(c, validation_slides="slide0")
    assert model.train_params_["validation_groups"] == ["slide0"]
    assert model.train_params_["train_groups"] == ["slide1"]
    record = c["slide1"].tables["table"].uns["spade"]
    assert record["torch_threads"] == torch.get_num_threads()


def test_fit_computes_features_of_every_slide_or_of_none(res):
    c = res.cohort(features=False)
    model = _fit(c, features_key=None, encoder=res.encoder)
    for s in c.values():
        t = s.tables["table"]
        assert "X_mean" in t.obsm and "X_mean" in t.uns and SPADE in t.obsm
    assert model.features_key == "X_mean"


def test_slide_embeddings_writes_every_slide(res):
    c = res.whole()
    adata = _slides(c, res)
    assert list(adata.obs_names) == ["slide0", "slide1"]
    for s in c.values():
        assert "X_mean" in s.tables["image_tiles_table"].obsm and "spade_slides" in s.tables


@pytest.mark.parametrize("name", list(EVALUATE_CORRUPTIONS))
def test_evaluate_refuses_before_any_training(name, res, tmp_path, monkeypatch):
    exc, match, corrupt = EVALUATE_CORRUPTIONS[name]
    c = _eval_cohort(res, tmp_path)
    corrupt(c)
    trained = []
    monkeypatch.setattr("spade_sc.tl._evaluate.fit", lambda *a, **k: trained.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            _evaluate(c)
    assert not trained, f"{name}: a fold trained before the error"


def test_evaluate_works_on_copies_and_takes_a_single_fold_id(res, tmp_path):
    c = _eval_cohort(res, tmp_path)
    before = snapshot(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few spots per tissue, one-epoch training
        result = _evaluate(c, folds="slide0", representations=["base", "spade_soft"], label_key="cluster")
    assert list(result.protocol["folds"]) == ["slide0"]
    assert result.protocol["folds"]["slide0"]["test"] == ["slide0"]
    assert set(result.table["representation"]) == {"base", "spade_soft"}
    assert snapshot(c) == before, "evaluate wrote into the cohort"


def test_slide_embeddings_from_base_features_reads_no_image(res):
    c = res.tiled()
    for i, s in enumerate(c.values()):
        t = s.tables["image_tiles_table"]
        t.obsm[FEATURES] = np.random.default_rng(i).normal(size=(t.n_obs, DIM)).astype(np.float32)
        del t.obsm[SPADE]
        s.attrs.clear()  # no pixel size: the image is not needed, and not checked
    adata = sp.tl.slide_embeddings(c, sp.model.SpadeModel.load(res.model_dir), progress=False)
    assert adata.obsm[SPADE].shape == (4, 4)
    assert all(SPADE in s.tables["image_tiles_table"].obsm for s in c.values())


# ---------------------------------------------------------------------------------------------------------------------
# the command line: exit 2, one line naming the culprit, nothing written
# ---------------------------------------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def _demo_out_file(tmp: Path) -> list[str]:
    (tmp / "out.txt").write_text("x")
    return ["demo", "--out", str(tmp / "out.txt")]


def _demo_out_not_empty(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("x")
    return ["demo", "--out", str(tmp / "out")]


def _embed_truncated(tmp: Path) -> list[str]:
    _truncate(tmp / "model" / "model.safetensors")
    return ["embed", str(tmp / "m.csv"), "--model", str(tmp / "model"), "--out", str(tmp / "o")]


def _embed_key_path(tmp: Path) -> list[str]:
    _edit_json(tmp / "model" / "config.json", lambda c: c["init_params"].update(features_key="../x"))
    return ["embed", str(tmp / "m.csv"), "--model", str(tmp / "model"), "--out", str(tmp / "o")]


CLI_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "demo-out-is-a-file": (_demo_out_file, r"out\.txt"),
    "demo-out-not-empty": (_demo_out_not_empty, r"out.*--overwrite"),
    "mil-time-without-event": (lambda tmp: ["mil", str(tmp), "--out", str(tmp / "o"), "--time", "t"], r"--event"),
    "unknown-command": (lambda tmp: ["train", str(tmp)], r"train"),
    "embed-model-truncated": (_embed_truncated, r"model\.safetensors"),
    "embed-model-key-path": (_embed_key_path, r"features_key"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_user_error_exits_2_with_one_line(name, res, tmp_path, capsys):
    res.model_copy(tmp_path)
    make, match = CLI_CASES[name]
    argv = make(tmp_path)
    before = snapshot(tmp_path)
    code, err = _cli(argv, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(match, err), err
    assert snapshot(tmp_path) == before
