"""Veil: privacy-preserving medical research from JupyterLab."""

__version__ = "0.1.0"
