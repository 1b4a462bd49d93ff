"""Tests of dataset runs."""
