"""distillery: train, distill, compress, measure and serve fast models on Ray."""

__version__ = "0.1.0"
