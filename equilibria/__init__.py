"""equilibria: implicit layers for PyTorch."""

__version__ = "0.1.0"
