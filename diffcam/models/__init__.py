"""The bundled diffusion MLLM: :mod:`.bundled` (model, config, tokenizer), :mod:`.train` (the
training script, ``python -m diffcam.models.train``), :mod:`.evaluate` (answer accuracy and map
scores) and the shipped weights under ``weights/``.  Load it with ``diffcam.load("bundled")``."""
