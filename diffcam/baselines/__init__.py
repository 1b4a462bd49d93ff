"""The baselines of method.md section 4, computed on the same model and the same image span.

* Grad-CAM: the raw map of the attribution engine with no refinement
  (:func:`diffcam.attribution.grad_cam`; ``Explainer.explain(..., method="grad-cam")``).
* LLaVA-CAM (:mod:`.llava_cam`): Grad-CAM on the output of a block's post-attention norm (the MLP
  input) with ReLU'd gradients, channel mean, max-normalised and thresholded
  (``method="llava-cam"``).
* Token Activation Map (:mod:`.tam`): gradient-free, the final layer's logit lens at every image
  position with estimated causal inference against the earlier context tokens
  (``method="tam"``).

The functions here are the formulas, on tensors; the :class:`~diffcam.Explainer` runs the model.

>>> import torch
>>> from diffcam.baselines import llava_cam
>>> A = torch.rand(3, 3, 8); G = torch.randn(3, 3, 8)
>>> llava_cam(A, G).shape
torch.Size([3, 3])
"""

from .llava_cam import DEFAULT_THRESHOLD, llava_cam, mlp_input_norm
from .tam import eci, tam_token_scores

__all__ = ["llava_cam", "mlp_input_norm", "DEFAULT_THRESHOLD", "eci", "tam_token_scores"]
