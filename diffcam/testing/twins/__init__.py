"""Structural twins of the real diffusion MLLM families, built in process from transformers
classes with random weights: same attribute paths, block return types, token ids and image
packing as the real checkpoints, small enough for CPU tests.  One module per family."""
