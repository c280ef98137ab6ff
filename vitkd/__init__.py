"""vitkd: compress Vision Transformers when the teacher's original training data is not available."""

from vitkd import deprecated as _deprecated

__version__ = "0.1.0"

_deprecated.install()
