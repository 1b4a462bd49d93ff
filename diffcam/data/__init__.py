"""Datasets: :mod:`diffcam.data.shapes`, the procedural grounded world of the bundled model."""
