"""Tests of the bundled model: training, loading, quality on the shipped weights."""
