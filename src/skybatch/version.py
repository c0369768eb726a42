"""The package's version, apart from ``skybatch/__init__`` so that every layer can read it
without importing the public API (and so the client) above it."""

__version__ = "0.1.0"

__all__ = ["__version__"]
