"""Data-free image generators: DAFL's convolutional generator, vitkd's transformer-augmented generator, and
Fast-DFKD's meta-synthesis round with its memory bank."""

from __future__ import annotations

from vitkd.errors import VitkdInputError
from vitkd.generators.dafl import DAFLGenerator
from vitkd.generators.fast import MemoryBank, meta_synthesize
from vitkd.generators.transformer_gan import TransformerGenerator
from vitkd.generators.views import photometric_view

GENERATORS = {"dafl": DAFLGenerator, "transformer": TransformerGenerator}


def create_generator(name: str, img_size: int, in_chans: int, latent_dim: int, **kwargs):
    """Build a generator by name (``dafl`` or ``transformer``) for the teacher's input size and channels."""
    if name not in GENERATORS:
        raise VitkdInputError(f"unknown generator {name!r}: use one of {sorted(GENERATORS)}")
    return GENERATORS[name](img_size=img_size, in_chans=in_chans, latent_dim=latent_dim, **kwargs)


__all__ = [
    "MemoryBank",
    "meta_synthesize",
    "DAFLGenerator",
    "TransformerGenerator",
    "GENERATORS",
    "create_generator",
    "photometric_view",
]
