"""Frozen image encoders (torch + timm) turning H&E patches into feature vectors.

Use :func:`get_encoder` to build an :class:`Encoder`; :func:`encoder_from_spec` rebuilds one from its
JSON-serialisable :attr:`Encoder.spec`.
"""

from ._encoder import DEFAULT_ENCODER, SPEC_KINDS, Encoder, encoder_from_spec, get_encoder

__all__ = ["DEFAULT_ENCODER", "SPEC_KINDS", "Encoder", "encoder_from_spec", "get_encoder"]
