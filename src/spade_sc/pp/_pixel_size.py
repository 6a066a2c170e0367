"""Record the physical pixel size of a SpatialData."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._sdata import image_pixel_size, resolve_key, set_microns_per_unit

if TYPE_CHECKING:
    from spatialdata import SpatialData


def set_pixel_size(sdata: SpatialData, microns: float, *, coordinate_system: str | None = None) -> None:
    """Record how many micrometres one unit of a coordinate system spans.

    spade_sc converts between pixels and micrometres through this record, and through the spatialdata
    transformations of each element, so every image and pyramid level gets its own pixel size.

    Parameters
    ----------
    sdata
        The SpatialData to annotate (changed in place).
    microns
        Micrometres per unit of ``coordinate_system`` (for images registered with an identity transform:
        micrometres per full-resolution pixel).
    coordinate_system
        The coordinate system; may be omitted when the SpatialData has exactly one.

    Returns
    -------
    None
        Writes ``sdata.attrs["spade_sc"]["microns_per_unit"][coordinate_system]``.
    """
    if coordinate_system is None:
        systems = list(sdata.coordinate_systems)
        if len(systems) != 1:
            msg = f"This SpatialData has the coordinate systems {systems}: pass coordinate_system=."
            raise ValueError(msg)
        coordinate_system = systems[0]
    elif coordinate_system not in sdata.coordinate_systems:
        msg = f"coordinate_system={coordinate_system!r} is not among {list(sdata.coordinate_systems)}."
        raise KeyError(msg)
    set_microns_per_unit(sdata, coordinate_system, microns)


def pixel_size(sdata: SpatialData, image_key: str | None = None) -> float:
    """Micrometres per full-resolution pixel of an image, from the recorded coordinate-system size.

    Parameters
    ----------
    sdata
        A SpatialData with a pixel size recorded (loaders of :mod:`spade_sc.datasets` do it;
        otherwise :func:`set_pixel_size`).
    image_key
        The image; may be omitted when there is only one.

    Returns
    -------
    float
        The pixel size in micrometres.
    """
    image_key = resolve_key(sdata, "images", image_key)
    return image_pixel_size(sdata, image_key)
