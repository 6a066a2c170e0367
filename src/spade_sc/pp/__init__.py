"""Preprocessing: pixel size, image features, tissue tiles, gene panel."""

from ._pixel_size import pixel_size, set_pixel_size

__all__ = ["pixel_size", "set_pixel_size"]
