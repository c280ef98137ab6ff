"""vitkd: compress Vision Transformers when the teacher's original training data is not available."""

__version__ = "0.1.0"
