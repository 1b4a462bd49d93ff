"""In-process tiny test models (random weights, seeded, no download ever), shared by the tests
and the benchmarks.  See :mod:`diffcam.testing.tiny`."""

from .tiny import (TinyAnyresVision, TinyMergedVision, WordTokenizer, tiny_llava_anyres,
                   tiny_qwen2vl)

__all__ = ["WordTokenizer", "TinyAnyresVision", "TinyMergedVision", "tiny_llava_anyres",
           "tiny_qwen2vl"]
