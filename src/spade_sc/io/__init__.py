"""Reading real inputs: whole-slide images, HEST-1k samples and Space Ranger outputs with their full-resolution H&E.

Each reader returns SpatialData objects with the pixel size recorded where every later step reads it
(:func:`spade_sc.pp.pixel_size`); images are lazy pyramids built from the files' own levels.
"""

from ._hest import read_hest
from ._visium import read_visium, read_visium_hd
from ._wsi import read_wsi

__all__ = ["read_hest", "read_visium", "read_visium_hd", "read_wsi"]
