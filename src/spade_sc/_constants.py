"""The vocabulary of spade_sc: every key it writes and every choice it offers, named once.

Every module imports these names instead of spelling the strings; :data:`WRITERS` tells the plotting functions
which call writes a key, so that their "missing key" messages point at the right tool.
"""

from __future__ import annotations

__all__ = [
    "EVALUATION_TASKS",
    "EXTRA_REPRESENTATIONS",
    "GENE_INPUTS",
    "LOSSES",
    "MIL_TASKS",
    "REPRESENTATIONS",
    "ROUTINGS",
    "WRITERS",
    "Keys",
]


class Keys:
    """Names of what spade_sc writes into a SpatialData (see ``docs/conventions.md``)."""

    #: ``sdata.attrs`` entry holding spade_sc's slide-level records (pixel sizes, slide labels).
    ATTRS = "spade_sc"
    #: ``sdata.attrs["spade_sc"]`` entry: micrometres per unit of each coordinate system.
    MICRONS_PER_UNIT = "microns_per_unit"
    #: ``sdata.attrs["spade_sc"]`` entry: slide-level labels (e.g. the tissue of a slide).
    SLIDE = "slide"
    #: ``sdata.attrs["spade_sc"]`` entry: the record of a slide file read by :func:`spade_sc.io.read_wsi`.
    WSI = "wsi"
    #: ``sdata.attrs["spade_sc"]`` entry: the HEST-1k metadata of a sample read by :func:`spade_sc.io.read_hest`.
    HEST = "hest"
    #: ``obsm``: the SPADE embedding.
    SPADE = "X_spade"
    #: ``obs``: the data expert of each spot or tile (categorical).
    EXPERT = "spade_expert"
    #: ``obsm``: routing weights over the experts.
    ROUTING = "spade_routing"
    #: ``obs``: entropy of the routing weights.
    ROUTING_ENTROPY = "spade_routing_entropy"
    #: ``uns``: provenance of an embedding (parameters, gene panel, fingerprint, versions).
    PROVENANCE = "spade"
    #: ``uns``: the gene panel of :func:`spade_sc.pp.gene_panel`.
    PANEL = "spade_panel"
    #: ``uns``: the data experts of :func:`spade_sc.tl.build_experts`.
    EXPERTS = "spade_experts"
    #: ``obs`` of a tiles table: raw attention score of a slide-level model.
    ATTENTION = "spade_attention"
    #: ``obs`` of a tiles table: percentile rank of the attention score.
    ATTENTION_PCT = "spade_attention_pct"
    #: ``obsm``: expression predicted from the image by :func:`spade_sc.tl.predict_expression`.
    PREDICTED = "spade_predicted"
    #: ``uns`` of a tiles table: the parameters of :func:`spade_sc.pp.tile_tissue`.
    TILING = "tile_tissue"
    #: table (not annotating) of slide-level embeddings.
    SLIDES = "spade_slides"
    #: suffix of the shapes element of the tissue tiles of an image.
    TILES_SUFFIX = "_tiles"

    @staticmethod
    def features(encoder_name: str) -> str:
        """``obsm`` key of the patch features of an encoder: ``"X_<encoder name>"``."""
        return f"X_{encoder_name}"

    @staticmethod
    def tiles(image_key: str) -> str:
        """Shapes key of the tiles of ``image_key``."""
        return f"{image_key}{Keys.TILES_SUFFIX}"

    @staticmethod
    def tiles_table(image_key: str) -> str:
        """Table key of the tiles of ``image_key``."""
        return Keys.table_of(Keys.tiles(image_key))

    @staticmethod
    def table_of(shapes_key: str) -> str:
        """Key of the table that :func:`spade_sc.pp.tile_tissue` writes for the shapes ``shapes_key``."""
        return f"{shapes_key}_table"

    @staticmethod
    def pct(key: str) -> str:
        """``obs`` key of the percentile rank written beside the score ``key``."""
        return f"{key}_pct"


#: Routing strategies at inference.
ROUTINGS = ("soft", "hard", "uniform")
#: Contrastive losses.
LOSSES = ("soft_clip", "infonce")
#: Gene input of the model.
GENE_INPUTS = ("log1p", "counts")
#: Slide-level tasks of the MIL models.
MIL_TASKS = ("classification", "survival")
#: Representations :func:`spade_sc.tl.evaluate` compares by default; any other name is read from ``obsm``.
REPRESENTATIONS = ("base", "spade_soft", "spade_hard", "spade_uniform", "single_expert", "random_projection")
#: Built-in representations of :func:`spade_sc.tl.evaluate` that are not in the default list.
EXTRA_REPRESENTATIONS = ("untrained_heads",)
#: Protocols of :func:`spade_sc.tl.evaluate`.
EVALUATION_TASKS = ("expression", "label", "retrieval")

#: Which public call writes each key (used in the plotting functions' error messages).
WRITERS = {
    Keys.EXPERT: "spade_sc.tl.fit / spade_sc.tl.embed / spade_sc.tl.build_experts",
    Keys.ROUTING_ENTROPY: "spade_sc.tl.fit / spade_sc.tl.embed",
    Keys.ATTENTION: "spade_sc.tl.attention",
    Keys.ATTENTION_PCT: "spade_sc.tl.attention",
}
