"""Preprocessing: pixel size, image features, spatial context, tissue tiles, gene panel."""

from ._context import spatial_context
from ._features import image_features
from ._genes import gene_matrix, gene_panel
from ._pixel_size import pixel_size, set_pixel_size
from ._tiles import tile_tissue

__all__ = [
    "gene_matrix",
    "gene_panel",
    "image_features",
    "pixel_size",
    "set_pixel_size",
    "spatial_context",
    "tile_tissue",
]
