"""Metrics of the Diffusion-CAM paper (docs/method.md section 3), and beyond it.

* :func:`localization` -- Obj-IoU, contrast, concentration, F3 (the paper's protocol);
  :func:`summarize` -- the dataset summary the paper reports;
* :func:`pointing_game` -- whether each map's peak lies on the object;
* :mod:`diffcam.metrics.tam` -- the Token Activation Map paper's token-level protocol (Obj-IoU
  of object words, Func-IoU of function words, F1-IoU);
* :mod:`diffcam.metrics.scoring` -- an explanation scored against named masks (which word
  names which mask; what ``diffcam run`` records and ``Explanation.score`` returns);
* :mod:`diffcam.metrics.faithfulness` -- deletion / insertion curves through the model (needs
  torch and an adapter; imported on its own, not by this package).

>>> import numpy as np
>>> from diffcam import metrics
>>> m = np.zeros((8, 8), np.float32); m[2:5, 2:5] = 1
>>> mask = np.zeros((1, 8, 8), bool); mask[0, 2:5, 2:5] = True
>>> s = metrics.localization(m, mask)
>>> s.obj_iou, s.concentration > 0.99
(1.0, True)
"""

from .localization import (HIGHER_IS_BETTER, LocalizationScores, f3_score, localization,
                           otsu_threshold, summarize)
from .pointing import pointing_game
from . import tam

__all__ = ["localization", "LocalizationScores", "otsu_threshold", "f3_score", "summarize",
           "HIGHER_IS_BETTER", "pointing_game", "tam"]
