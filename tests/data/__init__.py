"""Tests of the procedural shapes world."""
