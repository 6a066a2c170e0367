"""``tl.fit`` and ``tl.embed``: SPADE on SpatialData (the model object itself is :class:`spade_sc.model.SpadeModel`).

``fit`` resolves every slide's spots once, validates the counts through the gene panel's core before writing
anything, computes missing features, builds the data experts with the two-step k-means core (reusing its
assignment of every spot), trains, and writes the embedding. ``embed`` applies a trained model to a new slide.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._constants import GENE_INPUTS, LOSSES, ROUTINGS, Keys
from .._sdata import Spots, as_cohort, check_patch_source, commit, features_matrix, resolve_spots, staged
from .._validation import as_ids, check_choice, check_fraction, check_int, json_safe, named_errors
from ..model._files import versions
from ..model._spade_model import SpadeModel
from ..pp import gene_matrix, image_features
from ..pp._context import CONTEXT_RADIUS, check_radius, context_features, spot_centres
from ..pp._genes import panel_of_tables
from ._clustering import cohort_features, experts_of_tables, slide_tissues

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger("spade_sc")

#: Step-1 groups with more spots than this use MiniBatchKMeans in ``fit`` (as :func:`spade_sc.tl.build_experts`).
MINIBATCH_THRESHOLD = 200_000
#: What ``fit`` and ``embed`` pass to :func:`spade_sc.pp.image_features` for missing features, unless
#: ``feature_kwargs`` says otherwise: the mean of 8 dihedral views (benchmarks/README.md, her2st).
FEATURE_DEFAULTS: dict[str, Any] = {"views": 8}
#: Keys of ``fit(model_kwargs=...)``.
MODEL_KWARGS = ("proj_dim", "dropout")


def auto_n_experts(
    n_pairs: int,
    *,
    tissue_pairs: Sequence[int] = (),
    min_pairs_per_expert: int = 1000,
    max_experts: int = 16,
) -> int:
    """Number of experts for ``n_pairs`` training pairs: at most 16, each with about 1000 pairs or more.

    Measured on her2st (about 800 training pairs per leave-one-section-out fold, benchmarks/README.md): every
    split into 2, 8 or 16 experts lowered gene-expression prediction and label probes below the single expert,
    which itself beat the base features; experts need enough pairs each for their own contrastive heads.

    With ``tissue_pairs`` (the pairs of each tissue, when ``fit`` is given a ``tissue_key``): at least one expert
    per tissue holding half that minimum or more, since tissues may map morphology to expression differently
    (``benchmarks/mixture.py``: on a synthetic cohort of two organs, one expert per organ beats a single one).
    """
    by_pairs = n_pairs // min_pairs_per_expert
    by_tissue = sum(1 for n in tissue_pairs if n >= min_pairs_per_expert // 2)
    return int(np.clip(max(by_pairs, by_tissue), 1, max_experts))


# ---------------------------------------------------------------------- the model's view of a table
def model_features(model: SpadeModel, spots: Spots, *, where: str, features_key: str | None = None) -> np.ndarray:
    """The spots' features as ``model`` takes them (its ``features_key`` by default), in context if so trained."""
    feats = features_matrix(
        spots.table,
        features_key or model.features_key,
        where=where,
        dim=feature_dim(model),
        expected=f"the model (trained on {model.features_key!r})",
    )
    return model_input(model, spots, feats)


def feature_dim(model: SpadeModel) -> int:
    """The dimension of the features the model is given (half its input with a spatial context)."""
    dim = model.init_params_["image_dim"]
    return dim // 2 if model.init_params_.get("spatial_context") is not None else dim


def model_input(model: SpadeModel, spots: Spots, feats: np.ndarray) -> np.ndarray:
    """``[features, neighbours' mean]`` for a model trained in spatial context, otherwise the features themselves."""
    radius = model.init_params_.get("spatial_context")
    return feats if radius is None else context_features(feats, spot_centres(spots), radius)[0]


def model_tissues(model: SpadeModel, spots: Spots, name: str) -> np.ndarray | None:
    """The tissue of every spot, for a model with per-tissue experts (None otherwise, or when the slide lacks it).

    Read as :func:`fit` read it (the experts' ``tissue_key``: an obs column or a slide attribute); a slide without it
    is routed among all the experts, with a warning.
    """
    if not model.experts.per_tissue:
        return None
    key = model.experts.tissue_key
    try:
        return slide_tissues({name: (spots.table_key, spots.table)}, {name: spots.sdata}, key)[name]
    except (KeyError, ValueError) as err:
        logger.warning("Slide %s: no tissue (%s); its spots are routed among every tissue's experts.", name, err)
        return None


def model_gene_input(model: SpadeModel, table: AnnData) -> np.ndarray:
    """The model's gene input for every row of ``table`` (its panel genes, by name)."""
    return gene_matrix(table, model.genes, gene_input=model.init_params_["gene_input"])


def model_encoder(model: SpadeModel, where: str) -> Any:
    """The encoder the model's features came from, rebuilt from its record (an error when it records none)."""
    from ..encoders import Encoder

    if model.encoder_spec is None:
        msg = f"{where} and the model records no encoder to compute them."
        raise ValueError(msg)
    encoder = Encoder.from_spec(model.encoder_spec)
    if encoder.dim != feature_dim(model):
        msg = f"The model's encoder gives {encoder.dim}-d features; the model takes {feature_dim(model)}."
        raise ValueError(msg)
    return encoder


def compute_features(
    spots: Spots, encoder: Any, key: str, *, inplace: bool = True, progress: bool = True, **feature_kwargs: Any
) -> np.ndarray:
    """Patch features of the spots (:func:`spade_sc.pp.image_features`), written to ``obsm[key]`` when ``inplace``."""
    kwargs = {"encoder": encoder, "shapes_key": spots.shapes_key, "table_key": spots.table_key, "progress": progress}
    kwargs.update(feature_kwargs)
    if not inplace:
        return np.asarray(image_features(spots.sdata, inplace=False, **kwargs), dtype=np.float32)
    image_features(spots.sdata, key_added=key, **kwargs)
    return np.asarray(spots.table.obsm[key], dtype=np.float32)


# ---------------------------------------------------------------------- steps of fit / embed
def _check_fit_args(
    cohort: Mapping[str, SpatialData],
    validation_slides: str | Sequence[str] | None,
    validation_fraction: float,
    gene_input: str,
    loss: str,
    routing: str,
    key_added: str,
    model_kwargs: Mapping[str, Any] | None,
) -> list[str] | None:
    """Check the arguments of :func:`fit`; return ``validation_slides`` as a list (a single id is one slide)."""
    check_fraction(validation_fraction, "validation_fraction")
    validation_slides = as_ids(validation_slides, "validation_slides", known=cohort)
    if validation_slides is not None and len(validation_slides) >= len(cohort):
        msg = f"validation_slides {validation_slides} leaves no slide to train on (cohort: {sorted(cohort)})."
        raise ValueError(msg)
    check_choice(gene_input, "gene_input", GENE_INPUTS)
    check_choice(loss, "loss", LOSSES)
    check_choice(routing, "routing", ROUTINGS)
    if key_added == Keys.ROUTING:
        msg = f"key_added={key_added!r} collides with a key spade_sc writes."
        raise ValueError(msg)
    unknown = sorted(set(model_kwargs or {}) - set(MODEL_KWARGS))
    if unknown:
        msg = f"model_kwargs {unknown} are not model settings; choose among {MODEL_KWARGS}."
        raise ValueError(msg)
    return validation_slides


def _features_everywhere(
    spots: Mapping[str, Spots],
    features_key: str | None,
    encoder: Any,
    progress: bool,
    feature_kwargs: Mapping[str, Any] | None,
) -> tuple[str, dict[str, Any] | None, dict[str, Spots]]:
    """The features key of the cohort, the encoder spec, and working copies holding the features computed.

    Every slide that lacks the features is checked first (image, channels, pixel size, coordinate system), before
    features are computed on any; they are computed into working copies of the slides (:func:`staged`), which
    :func:`fit` commits once everything has succeeded.
    """
    from ..encoders import get_encoder

    enc = None
    if features_key is None:
        enc = get_encoder(encoder)
        features_key = Keys.features(enc.name)
    kwargs = {**FEATURE_DEFAULTS, **(feature_kwargs or {})}
    missing = [name for name, s in spots.items() if features_key not in s.table.obsm]
    for name in missing:  # cheap checks of every slide before any computation
        check_patch_source(spots[name], name, image_key=kwargs.get("image_key"), image_mpp=kwargs.get("image_mpp"))
    if missing and enc is None:
        enc = get_encoder(encoder)
    work = {}
    for name in missing:
        logger.info("spade_sc.tl.fit: computing %s features for slide %s", enc.name, name)
        work[name] = staged(spots[name])
        with named_errors(name):
            compute_features(work[name], enc, features_key, progress=progress, **kwargs)
    for name, s in spots.items():
        params = (work[name] if name in work else s).table.uns.get(features_key, {})
        if isinstance(params, Mapping) and "encoder" in params:
            return features_key, json_safe(dict(params["encoder"])), work
    return features_key, None if enc is None else enc.spec, work


def _n_experts(
    n_experts: int | str,
    n_clusters_per_tissue: int | str,
    n_pairs: int,
    tissue_pairs: Mapping[str, int],
    per_tissue: bool = False,
) -> tuple[int, int]:
    """(experts, step-1 clusters per tissue), resolving ``"auto"``.

    ``tissue_pairs``: pairs per tissue (or empty); ``per_tissue``: at least one expert per tissue.
    """
    if n_experts == "auto":
        k = auto_n_experts(n_pairs, tissue_pairs=list(tissue_pairs.values()))
        k = max(k, len(tissue_pairs)) if per_tissue else k
        logger.info(
            "spade_sc.tl.fit: %d training pairs%s -> n_experts=%d (auto: about 1000 pairs or more each%s)",
            n_pairs,
            f" in tissues {dict(tissue_pairs)}" if tissue_pairs else "",
            k,
            ", at least one per tissue of 500 or more" if tissue_pairs else "",
        )
    else:
        k = check_int(n_experts, "n_experts")
    k1 = max(16, k) if n_clusters_per_tissue == "auto" else check_int(n_clusters_per_tissue, "n_clusters_per_tissue")
    return k, k1


def _tissue_pairs(
    tables: Mapping[str, tuple[str, AnnData]], cohort: Mapping[str, SpatialData], tissue_key: str
) -> dict[str, int]:
    """Spots (pairs) of each tissue of ``tissue_key``."""
    tissues = np.concatenate(list(slide_tissues(tables, cohort, tissue_key).values()))
    return {str(t): int(n) for t, n in pd.Series(tissues).value_counts(sort=False).items()}


def _validation_split(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    tables: Mapping[str, tuple[str, AnnData]],
    validation_slides: Sequence[str] | None,
    validation_fraction: float,
    seed: int,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], list[str]]:
    """Training groups and the validation groups among them: by slide, or by spatial block of a single slide."""
    if len(pairs) == 1:
        name = next(iter(pairs))
        if validation_fraction == 0:
            return dict(pairs), []
        masks = _split_single_slide(tables[name][1], name, validation_fraction)
        return {g: tuple(a[m] for a in pairs[name]) for g, m in masks.items()}, [f"{name}:validation"]
    if validation_slides is not None:
        return dict(pairs), list(validation_slides)
    if validation_fraction == 0:
        return dict(pairs), []
    n_val = max(1, round(validation_fraction * len(pairs)))
    rng = np.random.default_rng(seed)
    return dict(pairs), sorted(rng.choice(sorted(pairs), size=n_val, replace=False).tolist())


def _split_single_slide(table: AnnData, name: str, fraction: float) -> dict[str, np.ndarray]:
    """Spatially blocked split of one slide: the spots right of the (1 - fraction) x-quantile are held out."""
    xy = np.asarray(table.obsm["spatial"]) if "spatial" in table.obsm else None
    if xy is None:
        msg = f"Slide {name!r}: a single slide needs obsm['spatial'] for the spatially blocked validation split."
        raise ValueError(msg)
    cut = np.quantile(xy[:, 0], 1 - fraction)
    val = xy[:, 0] > cut
    return {f"{name}:train": ~val, f"{name}:validation": val}


def _check_encoder_name(spots: Spots, features_key: str, model: SpadeModel) -> None:
    """Refuse stored features whose recorded encoder is not the model's."""
    stored = spots.table.uns.get(features_key, {})
    stored_name = stored.get("encoder", {}).get("name") if isinstance(stored, Mapping) else None
    model_name = (model.encoder_spec or {}).get("name")
    if stored_name and model_name and stored_name != model_name:
        msg = (
            f"obsm[{features_key!r}] of table {spots.table_key!r} comes from encoder {stored_name!r}; "
            f"the model's is {model_name!r}."
        )
        raise ValueError(msg)


def _spade_record(model: SpadeModel, *, routing: str, key_added: str, features_key: str) -> dict[str, Any]:
    """The ``uns["spade"]`` provenance of an embedding (the same for every slide embedded by one call)."""
    return {
        "params": {**model.init_params_, "routing": routing, "key_added": key_added, "features_key": features_key},
        "genes": list(model.genes),
        "fingerprint": model.fingerprint(),
        "train_params": json.loads(json.dumps(model.train_params_, default=str)),
        "experts": model.experts.config()["params"],
        "torch_threads": int(model.train_params_.get("torch_threads") or _torch_threads()),
        "versions": versions(),
    }


def _torch_threads() -> int:
    """Torch's intra-op thread count (recorded: results are bitwise reproducible at a fixed count)."""
    import torch

    return torch.get_num_threads()


def _write_embedding(
    table: AnnData,
    model: SpadeModel,
    emb: np.ndarray,
    weights: np.ndarray,
    assigned: np.ndarray,
    record: Mapping[str, Any],
) -> None:
    cats = [str(k) for k in range(model.n_experts)]
    table.obsm[record["params"]["key_added"]] = emb
    table.obs[Keys.EXPERT] = pd.Categorical([str(a) for a in assigned], categories=cats)
    table.obsm[Keys.ROUTING] = weights
    w = np.clip(weights, 1e-12, 1.0)
    table.obs[Keys.ROUTING_ENTROPY] = -(w * np.log(w)).sum(1)
    table.uns[Keys.PROVENANCE] = copy.deepcopy(dict(record))


# ---------------------------------------------------------------------- public API
def fit(
    sdata_or_cohort: SpatialData | Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    features_key: str | None = None,
    encoder: Any = "efficientnet_lite0",
    n_experts: int | Literal["auto"] = "auto",
    n_clusters_per_tissue: int | Literal["auto"] = "auto",
    tissue_key: str | None = None,
    n_top_genes: int = 50,
    gene_input: Literal["counts", "log1p"] = "log1p",
    loss: Literal["soft_clip", "infonce"] = "soft_clip",
    routing: Literal["soft", "hard", "uniform"] = "soft",
    routing_tau: float | Literal["auto"] = 0.1,
    max_epochs: int = 100,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    validation_slides: Sequence[str] | None = None,
    validation_fraction: float = 0.2,
    early_stopping_patience: int | None = None,
    table_key: str | None = None,
    shapes_key: str | None = None,
    seed: int = 0,
    key_added: str = "X_spade",
    trainer_kwargs: Mapping[str, Any] | None = None,
    feature_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    experts_per_step: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    align_experts: bool = True,
    spatial_context: float | None = CONTEXT_RADIUS,
    tissue_experts: bool | None = None,
) -> SpadeModel:
    """Fit SPADE on one slide or a cohort: features, gene panel, data experts, contrastive training, embedding.

    Every missing step runs with defaults: patch features with ``encoder`` (:func:`spade_sc.pp.image_features`)
    for slides that lack ``obsm[features_key]``, the gene panel (:func:`spade_sc.pp.gene_panel`), the two-step
    data experts (:func:`spade_sc.tl.build_experts`). Training draws every contrastive batch from one expert's
    pairs (hard negatives), uses AdamW with a cosine schedule, and keeps the epoch with the lowest loss on
    held-out **slides**.

    Every slide is checked before anything is computed (counts, genes, keys, and, where features are missing,
    image, channels, pixel size, coordinate system); features are computed into working copies and written, with
    the embedding, only once training has succeeded: a failing call leaves every slide as it was. Training needs
    at least 2 training pairs (spots) of one data expert (a contrastive batch needs 2), and as many validation
    pairs when validating; fewer is an error, never an untrained model.

    Parameters
    ----------
    sdata_or_cohort
        One SpatialData, ``{slide id: SpatialData}`` or a sequence of them.
    features_key
        ``obsm`` key of existing features; default ``"X_<encoder name>"``, computed where missing.
    encoder
        Encoder spec for missing features (see :func:`spade_sc.encoders.get_encoder`).
    n_experts
        Number of data experts; ``"auto"``: ``clip(n_pairs // 1000, 1, 16)`` (16 as in the paper on large
        cohorts, fewer when each expert would get too few pairs to train on); with ``tissue_key``, at least one
        per tissue of 500 pairs or more (:func:`auto_n_experts`).
    n_clusters_per_tissue
        Step-1 clusters per tissue type; ``"auto"``: 16 (the paper), at least ``n_experts``.
    tissue_key
        Tissue / organ grouping of step 1: an ``obs`` column, or a key of ``sdata.attrs["spade_sc"]["slide"]``.
    n_top_genes
        HVGs per slide in the gene panel.
    gene_input
        Gene input of the model: ``"log1p"`` (normalised) or ``"counts"`` (raw, as the reference code).
    loss
        ``"soft_clip"`` (BLEEP) or ``"infonce"`` (CLIP with a learnable temperature).
    routing
        Routing written to ``obsm[key_added]``: ``"soft"``, ``"hard"`` or ``"uniform"``.
    routing_tau
        Soft-routing temperature; ``"auto"``: set from the training features
        (:func:`spade_sc.model.scale_aware_tau`: the median gap between a spot's distances to its nearest and
        second-nearest centroid), so that soft routing stays soft whatever the scale of the features. Matters
        only with several experts.
    max_epochs
        Training epochs.
    batch_size
        Pairs per expert batch.
    lr
        AdamW learning rate. 1e-3 rather than the paper's 1e-4: the paper trained on 10^5-10^6 pairs; on about a
        thousand pairs (her2st) 1e-4 had not converged after 300 epochs and gave a weaker embedding
        (benchmarks/README.md).
    weight_decay
        Weight decay.
    validation_slides
        Slides held out to pick the best epoch: one slide id (``"slide0"``) or a sequence of them; default a
        ``validation_fraction`` of the slides (at least one when there are two or more). A single slide is split
        into spatial blocks: the spots right of the ``1 - validation_fraction`` quantile of x are held out.
    validation_fraction
        Fraction of slides (or of one slide's width) used for validation; 0 disables validation.
    early_stopping_patience
        Stop after this many epochs without improvement of the validation loss.
    table_key, shapes_key
        The spot table and shapes of every slide, when a slide holds several.
    seed
        Seed of k-means, initialisation, batching and the validation draw. The same seed gives a bitwise identical
        model at a fixed number of torch threads (``torch.get_num_threads()``, recorded in ``uns["spade"]``);
        with another thread count the float sums run in another order and the weights differ by about 1e-4 (the
        nearest neighbours of the embedding stay the same).
    key_added
        ``obsm`` key of the embedding.
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (e.g. ``accelerator="gpu", devices=4, strategy="ddp"``).
    feature_kwargs
        Passed to :func:`spade_sc.pp.image_features` for missing features, over the default ``{"views": 8}`` (the
        mean of the patch's 8 dihedral orientations; ``{"views": 1}`` is 8x faster and predicts expression less
        well).
    progress
        Progress bars.
    experts_per_step
        Single-expert batches (of distinct experts) per optimiser step, each expert's contrastive loss computed
        within its own rows (hard negatives kept); None: all experts in each step, 1: one expert per step.
    model_kwargs
        Sizes of the heads, passed to :class:`~spade_sc.model.SpadeModel`: ``proj_dim`` (embedding dimension,
        default 256) and ``dropout`` (inside each head, default 0.1).
    checkpoint_dir
        Folder of a training checkpoint written at the end of every epoch (safetensors + JSON, no pickle, replaced
        atomically; see :meth:`spade_sc.model.SpadeModel.train`). A folder already holding one is refused unless
        ``resume``.
    resume
        Continue the training from the checkpoint in ``checkpoint_dir`` (from epoch 0 when there is none yet). The
        features, panel and experts are recomputed (deterministic for a seed); a checkpoint of another model
        configuration, other settings or other slides is refused, naming the difference. A killed and resumed fit
        ends with bitwise the same weights as an uninterrupted one (same seed, device and torch thread count).
    align_experts
        With several experts, rotate the experts' embedding spaces into one once training ends (see
        :meth:`~spade_sc.model.SpadeModel.train`), so that a read-out of ``obsm[key_added]`` sees one coordinate
        system; False: the paper's unaligned mixture. No effect with one expert.
    spatial_context
        Give the model each spot in its context: its image input is ``[features, mean features of the neighbouring
        spots]`` (:func:`spade_sc.pp.spatial_context`), neighbours being the spots within this radius, in units of
        the spot spacing (default 1.6: the first ring on Visium and ST grids). The data experts are built on that
        input too, and :func:`embed` builds it for new slides. On held-out her2st sections this lifted gene
        prediction from 50 labelled spots from 1.22x to 1.50x the base features and 5-shot region labels from
        +9 % to +27 % (with 8-view features, benchmarks/README.md). None: each spot alone (the paper's model).
    tissue_experts
        Build the experts within each tissue of ``tissue_key`` (step 2 per tissue; the experts are shared out in
        proportion to the tissues' spots, at least one each) and route every spot among its own tissue's experts,
        in training and wherever its tissue is known (:func:`embed` reads it from the same key; a slide without it
        is routed among all). None (default): on when a ``tissue_key`` is given; False: the paper's pooled step 2
        and routing by image features alone. On a synthetic cohort of two organs that map the same morphology to
        different expression, per-tissue experts predicted expression from 50 spots 1.4-1.8x better than one
        expert, whether the organs' images differ in hue or not; the pooled mixture did not beat one expert
        (``benchmarks/mixture.py``).

    Returns
    -------
    The trained :class:`SpadeModel`. Writes into the spot table of every slide:

    - ``obsm[key_added]``: the SPADE embedding (n_spots x ``proj_dim``) with ``routing``;
    - ``obs["spade_expert"]``: the expert of the nearest step-1 centroid (categorical);
    - ``obsm["spade_routing"]``: routing weights (n_spots x K, rows sum to 1);
    - ``obs["spade_routing_entropy"]``: entropy of those weights;
    - ``uns["spade"]``: parameters, gene panel (``genes``), data experts (``experts``: tissue key, clusters per
      tissue, WCSS), model fingerprint, training record, ``torch_threads`` (of the training), versions;
    - ``obsm["X_<encoder>"]`` and ``uns["X_<encoder>"]`` where features were computed.
    """
    import torch

    threads = torch.get_num_threads()  # scanpy's numba kernels in the gene panel can change it
    cohort = as_cohort(sdata_or_cohort)
    spots = {name: resolve_spots(s, table_key, shapes_key) for name, s in cohort.items()}
    tables = {name: (s.table_key, s.table) for name, s in spots.items()}
    validation_slides = _check_fit_args(
        cohort, validation_slides, validation_fraction, gene_input, loss, routing, key_added, model_kwargs
    )
    check_choice(align_experts, "align_experts", (True, False))
    radius = None if spatial_context is None else check_radius(spatial_context)
    check_choice(tissue_experts, "tissue_experts", (True, False, None))
    if tissue_experts is None:
        tissue_experts = tissue_key is not None
    if tissue_experts and tissue_key is None:
        msg = "tissue_experts=True needs a tissue_key (the obs column or slide attribute naming each spot's tissue)."
        raise ValueError(msg)
    if routing_tau != "auto" and not (isinstance(routing_tau, int | float) and 0 < routing_tau < np.inf):
        msg = f"routing_tau must be a positive number or 'auto', got {routing_tau!r}."
        raise ValueError(msg)
    # Gene panel first: it validates the counts (shared genes, NaN, negative values) before anything is written.
    genes, _ = panel_of_tables(tables, n_top_genes=check_int(n_top_genes, "n_top_genes"))
    torch.set_num_threads(threads)
    # features computed into working copies (work), written into the slides only once everything has succeeded
    features_key, encoder_spec, work = _features_everywhere(spots, features_key, encoder, progress, feature_kwargs)
    every = {**spots, **work}
    feats = cohort_features({n: (s.table_key, s.table) for n, s in every.items()}, features_key)
    if radius is not None:
        feats = {name: context_features(x, spot_centres(every[name]), radius)[0] for name, x in feats.items()}
    n_pairs = sum(len(x) for x in feats.values())
    tissue_pairs = {} if tissue_key is None or n_experts != "auto" else _tissue_pairs(tables, cohort, tissue_key)
    k, k1 = _n_experts(n_experts, n_clusters_per_tissue, n_pairs, tissue_pairs, tissue_experts)
    experts, assigned = experts_of_tables(
        tables,
        cohort,
        feats,
        tissue_key=tissue_key,
        n_clusters_per_tissue=k1,
        n_experts=k,
        seed=seed,
        minibatch_threshold=MINIBATCH_THRESHOLD,
        per_tissue=tissue_experts,
    )
    experts.features_key, experts.tissue_key = features_key, tissue_key
    tau_auto = routing_tau == "auto"
    if tau_auto:
        from ..model._routing import scale_aware_tau  # torch: imported when needed (import spade_sc stays light)

        routing_tau = scale_aware_tau(np.concatenate(list(feats.values())), experts.centroids)
        logger.info("spade_sc.tl.fit: routing_tau='auto' -> %.4g (median nearest-centroid gap)", routing_tau)
    gene_inputs = {name: gene_matrix(t, genes, gene_input=gene_input) for name, (_, t) in tables.items()}
    pairs = {name: (feats[name], gene_inputs[name], assigned[name]) for name in cohort}
    groups, validation = _validation_split(pairs, tables, validation_slides, validation_fraction, seed)

    model = SpadeModel(
        experts,
        genes,
        next(iter(feats.values())).shape[1],
        features_key=features_key,
        encoder_spec=encoder_spec,
        gene_input=gene_input,
        loss=loss,
        routing=routing,
        routing_tau=routing_tau,
        seed=seed,
        spatial_context=radius,
        **dict(model_kwargs or {}),
    )
    model.train(
        groups,
        validation=validation,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        early_stopping_patience=early_stopping_patience,
        trainer_kwargs=trainer_kwargs,
        progress=progress,
        experts_per_step=experts_per_step,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        align_experts=align_experts,
    )
    model.train_params_["n_experts_auto"] = n_experts == "auto"
    model.train_params_["tissue_key"] = tissue_key
    model.train_params_["routing_tau_auto"] = tau_auto

    record = _spade_record(model, routing=routing, key_added=key_added, features_key=features_key)
    tissues = slide_tissues(tables, cohort, tissue_key) if tissue_experts else {}
    embeddings = {name: model.get_image_embedding(feats[name], routing, tissues=tissues.get(name)) for name in tables}
    for name, w in work.items():
        commit(w, spots[name])
    for name, (_, t) in tables.items():
        _write_embedding(t, model, *embeddings[name], assigned[name], record)
    return model


def embed(
    sdata: SpatialData,
    model: SpadeModel,
    *,
    routing: Literal["soft", "hard", "uniform"] | None = None,
    features_key: str | None = None,
    table_key: str | None = None,
    shapes_key: str | None = None,
    key_added: str = "X_spade",
    inplace: bool = True,
    progress: bool = True,
    feature_kwargs: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Embed the spots or tiles of a new slide with a trained :class:`SpadeModel`.

    Features are computed with the model's own encoder when the table lacks them; features from another
    encoder or of another dimension are refused.

    Parameters
    ----------
    sdata
        The slide.
    model
        A trained model (:func:`fit` or :meth:`SpadeModel.load`); an untrained one is refused.
    routing
        ``"soft"``, ``"hard"`` or ``"uniform"``; defaults to the model's.
    features_key
        ``obsm`` key of the features; must be the model's (default).
    table_key, shapes_key
        The table and the shapes (spots or tiles) it annotates, when the slide holds several.
    key_added
        ``obsm`` key of the embedding.
    inplace
        Write into the table; when False, return ``(embedding, routing weights)`` and write nothing.
    progress
        Progress bar of the feature extraction.
    feature_kwargs
        Passed to :func:`spade_sc.pp.image_features` when features are computed, over the default
        ``{"views": 8}`` (as :func:`fit`); use the settings of the training features.

    Returns
    -------
    None when ``inplace``; writes into ``tables[t]``:

    - ``obsm[key_added]``: the embedding (n x 256);
    - ``obs["spade_expert"]``: the expert of the nearest step-1 centroid;
    - ``obsm["spade_routing"]``: routing weights (n x K);
    - ``obs["spade_routing_entropy"]``: entropy of those weights;
    - ``uns["spade"]``: parameters, gene panel, model fingerprint, versions;
    - ``obsm[<model features key>]`` / ``uns[...]`` when features were computed.

    Otherwise ``(embedding, routing weights)``.
    """
    if not getattr(model, "is_trained_", False):
        msg = (
            f"The model is untrained ({model!r}): its embedding would come from random weights. Train it with "
            "spade_sc.tl.fit, or load a trained model folder with SpadeModel.load."
        )
        raise ValueError(msg)
    features_key = features_key or model.features_key
    if features_key != model.features_key:
        msg = (
            f"features_key={features_key!r}, but the model was trained on {model.features_key!r} features; "
            "features from another encoder cannot be embedded."
        )
        raise ValueError(msg)
    routing = check_choice(routing or model.init_params_["routing"], "routing", ROUTINGS)
    spots = resolve_spots(sdata, table_key, shapes_key)
    where = f"table {spots.table_key!r}"
    if features_key in spots.table.obsm:
        _check_encoder_name(spots, features_key, model)
        feats = model_features(model, spots, where=where)
    else:
        encoder = model_encoder(model, f"{where} has no obsm[{features_key!r}]")
        kwargs = {**FEATURE_DEFAULTS, **(feature_kwargs or {})}
        feats = compute_features(spots, encoder, features_key, inplace=inplace, progress=progress, **kwargs)
        feats = model_features(model, spots, where=where) if inplace else model_input(model, spots, feats)
    tissues = model_tissues(model, spots, "the slide")
    emb, weights = model.get_image_embedding(feats, routing, tissues=tissues)
    if not inplace:
        return emb, weights
    record = _spade_record(model, routing=routing, key_added=key_added, features_key=features_key)
    _write_embedding(spots.table, model, emb, weights, model.experts.assign(feats, tissues=tissues), record)
    return None
