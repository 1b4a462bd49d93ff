"""Tests of the named-family adapters (issue 4), each on an in-process structural twin."""
