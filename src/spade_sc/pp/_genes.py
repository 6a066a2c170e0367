"""Gene side of SPADE: the cohort gene panel and the expression matrix on that panel.

Genes are always matched **by name** (``var_names``), never by column position: two tables may hold their genes in
any order, and a table may hold more genes than the panel.

Where counts are read from
--------------------------
``layer=`` names the layer explicitly; otherwise the ``"counts"`` layer is used when the table has one, else ``X``.
Counts are expected to be raw: non-negative (enforced) integers. Non-integer values are warned about, and values that
look log-normalised (non-integers, all below :data:`LOG_SCALE_MAX`) are refused where raw counts are required
(``gene_input="counts"``, the ``"seurat_v3"`` flavours) and warned about elsewhere, since they would be normalised a
second time. A slide without counts (every spot sums to 0 on the shared genes) is refused by name before scanpy runs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._constants import GENE_INPUTS, Keys
from .._sdata import as_cohort, resolve_table
from .._validation import check_choice, check_int

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: ``target_sum`` of the per-spot normalisation of :func:`gene_matrix` (``gene_input="log1p"``).
TARGET_SUM = 1e4
#: HVG flavours of scanpy that expect raw counts rather than log-normalised values.
_COUNT_FLAVORS = ("seurat_v3", "seurat_v3_paper")
_N_SHOWN = 10
#: Non-integer values all below this look log-normalised (log1p of 1e4-normalised counts stays below ~10).
LOG_SCALE_MAX = 20.0
#: Stored values sampled to tell raw counts from normalised values.
_KIND_SAMPLE = 200_000


def _counts_source(table: AnnData, layer: str | None, where: str) -> str | None:
    """The layer name counts are read from (None for ``X``)."""
    if layer is not None:
        if layer not in table.layers:
            msg = f"{where} has no layer {layer!r}; layers present: {sorted(table.layers)} (None reads X)."
            raise KeyError(msg)
        return layer
    return "counts" if "counts" in table.layers else None


def _counts(table: AnnData, source: str | None):
    return table.X if source is None else table.layers[source]


def _stored_values(matrix) -> np.ndarray:
    """The explicitly stored values of a dense or sparse matrix (no copy for sparse)."""
    from scipy import sparse

    if sparse.issparse(matrix):
        return np.asarray(matrix.data)
    return np.asarray(matrix)


def _check_counts(matrix, where: str) -> None:
    """Errors on NaN / inf / negative values, naming ``where``."""
    values = _stored_values(matrix)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        msg = f"{where} holds non-numeric counts (dtype {values.dtype})."
        raise TypeError(msg)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        msg = f"{where} holds {n_bad} NaN or infinite count value(s); raw counts are expected."
        raise ValueError(msg)
    if values.min() < 0:
        n_bad = int((values < 0).sum())
        msg = f"{where} holds {n_bad} negative count value(s); raw counts are expected."
        raise ValueError(msg)


def _values_kind(matrix) -> str:
    """``"counts"`` (integers), ``"log"`` (non-integers all below :data:`LOG_SCALE_MAX`) or ``"non-integer"``.

    Decided on an evenly strided sample of at most :data:`_KIND_SAMPLE` stored values.
    """
    values = _stored_values(matrix)
    if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return "counts"
    sample = values.ravel()[:: max(1, values.size // _KIND_SAMPLE)]
    sample = sample[np.isfinite(sample)]
    if not sample.size or np.array_equal(sample, np.round(sample)):
        return "counts"
    return "log" if float(sample.max()) < LOG_SCALE_MAX else "non-integer"


def _check_raw(matrix, where: str, *, required: str | None = None) -> None:
    """Warn when ``matrix`` does not hold raw counts; with ``required`` (what needs them), log values are an error."""
    kind = _values_kind(matrix)
    if kind == "counts":
        return
    if kind == "log":
        what = f"{where} holds non-integer values, all below {LOG_SCALE_MAX:g}: it looks log-normalised, not raw counts"
        if required is not None:
            msg = f"{what}, and {required} needs raw counts. Pass layer= naming the raw counts."
            raise ValueError(msg)
        msg = f"{what}; it would be normalised and log-transformed a second time. Pass layer= naming the raw counts."
    else:
        msg = f"{where} holds non-integer values; raw counts are expected (pass layer= naming the raw counts)."
    warnings.warn(msg, UserWarning, stacklevel=4)


def _check_unique(table: AnnData, where: str) -> None:
    if not table.var_names.is_unique:
        dup = table.var_names[table.var_names.duplicated()].unique().tolist()
        msg = (
            f"{where} has duplicated gene names (e.g. {dup[:_N_SHOWN]}); genes are matched by name, so names must be "
            "unique (see AnnData.var_names_make_unique)."
        )
        raise ValueError(msg)


def _source_label(source: str | None) -> str:
    return "X" if source is None else f"layer {source!r}"


def _where(sid: str, table_key: str, source: str | None) -> str:
    return f"Slide {sid!r}, table {table_key!r} ({_source_label(source)})"


def _spot_scale(counts) -> np.ndarray:
    """Per-spot factor scaling each row of ``counts`` to ``TARGET_SUM`` (float64; 0 for spots with no counts)."""
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    return np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)


def gene_panel(
    cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    n_top_genes: int = 50,
    flavor: str = "seurat",
    table_key: str | None = None,
    layer: str | None = None,
    inplace: bool = True,
) -> list[str]:
    """Select the SPADE gene panel: the union over slides of each slide's highly variable genes.

    1. The genes shared by every slide, by name.
    2. For each slide, on a copy of its table restricted to the shared genes: :func:`scanpy.pp.normalize_total`,
       :func:`scanpy.pp.log1p`, :func:`scanpy.pp.highly_variable_genes` with ``n_top_genes`` and ``flavor``
       (for the ``"seurat_v3"`` flavours, which model raw counts, the counts are passed unnormalised). The genes
       are put in sorted name order first, so the result does not depend on the column order of any table.
    3. The panel is the union of the per-slide highly variable genes, **sorted by name** (deterministic and
       independent of the order of the slides and of the genes within each table).

    All slides are validated before anything is written.

    Parameters
    ----------
    cohort
        One SpatialData, a mapping ``{slide id: SpatialData}`` or a sequence of them.
    n_top_genes
        Highly variable genes kept per slide (more when scanpy's cut-off ties).
    flavor
        ``flavor`` of :func:`scanpy.pp.highly_variable_genes`.
    table_key
        The table holding the counts in each SpatialData; may be omitted when each holds exactly one table.
    layer
        Layer holding the raw counts; by default the ``"counts"`` layer when present, else ``X``.
    inplace
        Whether to record the panel in every table.

    Returns
    -------
    list[str]
        The panel gene names, sorted. When ``inplace``, also writes into every table ``t``:

        - ``tables[t].uns["spade_panel"]``: ``genes`` (the panel), ``slide_genes`` (this slide's highly variable
          genes), ``params`` (``n_top_genes``, ``flavor``, ``layer`` (``"X"`` for X), ``n_shared_genes``,
          ``n_slides``, ``slides``).
    """
    check_int(n_top_genes, "n_top_genes")
    slides = as_cohort(cohort)
    tables = {sid: (tkey := resolve_table(sdata, table_key), sdata.tables[tkey]) for sid, sdata in slides.items()}
    panel, records = panel_of_tables(tables, n_top_genes=n_top_genes, flavor=flavor, layer=layer)
    if inplace:
        for sid, (_, table) in tables.items():
            table.uns[Keys.PANEL] = records[sid]
    return panel


def panel_of_tables(
    tables: Mapping[str, tuple[str, AnnData]], *, n_top_genes: int, flavor: str = "seurat", layer: str | None = None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The core of :func:`gene_panel` on resolved tables ``{slide id: (table key, AnnData)}``; writes nothing.

    Returns the panel and, per slide, the ``uns["spade_panel"]`` record :func:`gene_panel` writes.
    """
    sources = {}
    required = f"flavor={flavor!r}" if flavor in _COUNT_FLAVORS else None
    for sid, (tkey, table) in tables.items():
        source = _counts_source(table, layer, f"Slide {sid!r}, table {tkey!r}")
        where = _where(sid, tkey, source)
        _check_unique(table, where)
        _check_counts(_counts(table, source), where)
        _check_raw(_counts(table, source), where, required=required)
        sources[sid] = source
    shared_genes = _shared_genes(tables)
    for sid, (tkey, table) in tables.items():  # checked on every slide before scanpy runs on any
        _check_has_counts(table, sources[sid], shared_genes, _where(sid, tkey, sources[sid]))
    slide_genes = {
        sid: _slide_hvgs(table, sources[sid], shared_genes, n_top_genes, flavor, f"slide {sid!r}, table {tkey!r}")
        for sid, (tkey, table) in tables.items()
    }
    panel = sorted(set().union(*slide_genes.values()))
    logger.info("gene_panel: %d genes in the panel (union of %d slide(s))", len(panel), len(slide_genes))
    params = {
        "n_top_genes": int(n_top_genes),
        "flavor": str(flavor),
        "n_shared_genes": len(shared_genes),
        "n_slides": len(tables),
        "slides": list(tables),
    }
    records = {
        sid: {
            "genes": list(panel),
            "slide_genes": list(slide_genes[sid]),
            "params": {**params, "layer": "X" if sources[sid] is None else sources[sid]},
        }
        for sid in tables
    }
    return panel, records


def _shared_genes(tables: Mapping[str, tuple[str, AnnData]]) -> list[str]:
    """The gene names shared by every table, sorted."""
    shared = set(next(iter(tables.values()))[1].var_names)
    for _, table in tables.values():
        shared &= set(table.var_names)
    if not shared:
        sizes = {sid: int(t.n_vars) for sid, (_, t) in tables.items()}
        msg = (
            f"The slides {list(tables)} share no gene name (genes per slide: {sizes}); genes are matched by name, "
            "check that all tables use the same gene naming (symbols vs Ensembl ids)."
        )
        raise ValueError(msg)
    logger.info("gene_panel: %d genes shared by %d slide(s)", len(shared), len(tables))
    return sorted(shared)


def _check_has_counts(table: AnnData, source: str | None, shared_genes: list[str], where: str) -> None:
    """A slide without counts on ``shared_genes`` (every spot sums to 0, or no spot) is an error naming it."""
    X = _counts(table, source)[:, table.var_names.get_indexer(shared_genes)]
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    if not (totals > 0).any():
        n_genes = len(shared_genes)
        what = f"holds no counts: all {table.n_obs} spots sum to 0 on the {n_genes} genes shared by the slides"
        what = "holds no spot" if table.n_obs == 0 else what
        msg = (
            f"{where} {what}; a slide without counts gives no highly variable genes. Remove it from the cohort, or "
            "check its table (layer=)."
        )
        raise ValueError(msg)


def _slide_hvgs(
    table: AnnData, source: str | None, shared_genes: list[str], n_top_genes: int, flavor: str, where: str
) -> list[str]:
    """Highly variable genes of one table, on a normalised, log1p copy restricted to ``shared_genes``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    from scipy import sparse

    idx = table.var_names.get_indexer(shared_genes)
    X = _counts(table, source)[:, idx]
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float32)
    if sparse.issparse(X):
        X = sparse.csr_matrix(X)  # a copy already (the columns were selected)
        X.eliminate_zeros()  # stored zeros of empty spots would become 0 / 0 in the normalisation
    sub = ad.AnnData(X=X, var=pd.DataFrame(index=shared_genes))
    try:
        if flavor not in _COUNT_FLAVORS:
            sc.pp.normalize_total(sub)
            sc.pp.log1p(sub)
        sc.pp.highly_variable_genes(sub, n_top_genes=int(n_top_genes), flavor=flavor)
    except Exception as err:
        msg = f"highly_variable_genes(flavor={flavor!r}) failed on {where}: {err}"
        raise ValueError(msg) from err
    genes = sub.var_names[sub.var["highly_variable"].to_numpy(bool)].tolist()
    logger.debug("gene_panel: %s: %d highly variable genes", where, len(genes))
    return genes


def gene_matrix(
    table: AnnData,
    genes: Sequence[str],
    *,
    gene_input: Literal["log1p", "counts"] = "log1p",
    layer: str | None = None,
) -> np.ndarray:
    """The expression of a table on a gene panel, matched by name.

    Parameters
    ----------
    table
        An AnnData with raw counts (one row per spot or cell).
    genes
        The panel (e.g. from :func:`spade_sc.pp.gene_panel`); the columns of the result follow this order.
    gene_input
        ``"counts"``: the raw counts on the panel. ``"log1p"``: each spot is scaled to a total of ``1e4`` counts
        over **all** genes of the table (not only the panel, so the value of a gene does not depend on which other
        genes are in the panel), then ``log1p``; the panel columns are then selected. Spots with no counts stay 0.
    layer
        Layer holding the raw counts; by default the ``"counts"`` layer when present, else ``X``.

    Returns
    -------
    numpy.ndarray
        ``float32`` array ``(n_obs, len(genes))``. Nothing is written.
    """
    from scipy import sparse

    check_choice(gene_input, "gene_input", GENE_INPUTS)
    if isinstance(genes, str):
        msg = "genes must be a sequence of gene names, not a single string."
        raise TypeError(msg)
    genes = [str(g) for g in genes]
    if not genes:
        msg = "genes is empty: a panel of at least one gene is needed."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        msg = f"genes holds duplicated names: {dup[:_N_SHOWN]}."
        raise ValueError(msg)
    source = _counts_source(table, layer, "The table")
    where = f"The table ({_source_label(source)})"
    _check_unique(table, where)
    idx = table.var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        msg = (
            f"{len(missing)} of the {len(genes)} panel genes are absent from the table's var_names, "
            f"e.g. {missing[:_N_SHOWN]} (genes are matched by name)."
        )
        raise KeyError(msg)
    counts = _counts(table, source)
    # log1p uses every gene of the table (per-spot totals), so every value is checked; counts only the panel's.
    sub = counts[:, idx]
    _check_counts(counts if gene_input == "log1p" else sub, where)
    _check_raw(sub, where, required='gene_input="counts"' if gene_input == "counts" else None)
    sub = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    out = np.asarray(sub, dtype=np.float32)
    if gene_input == "counts":
        return out
    scale = _spot_scale(counts)
    out = (out.astype(np.float64) * scale[:, None]).astype(np.float32)
    np.log1p(out, out=out)
    return out
