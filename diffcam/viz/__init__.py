"""Overlays and image files without heavy dependencies."""

from .png import colorize, overlay, write_png

__all__ = ["colorize", "overlay", "write_png"]
