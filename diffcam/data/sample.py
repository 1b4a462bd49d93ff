"""One item of a dataset run: an image, a prompt, an optional answer and optional masks.

Every dataset source (:mod:`diffcam.data.coco`, :func:`diffcam.data.shapes.dataset`, a list a
user builds by hand) yields :class:`Sample` objects, and :func:`diffcam.run.run_dataset` consumes
them.  ``id`` is the resume key: it must be unique within a dataset and the same every time the
dataset is read, so that a run that stopped half-way skips exactly the samples it finished.

>>> import numpy as np
>>> from diffcam.data.sample import Sample
>>> s = Sample("img-1", np.zeros((8, 8, 3), np.uint8), "<image> describe the image .",
...            masks={"circle": np.eye(8, dtype=bool)})
>>> s.id, sorted(s.masks)
('img-1', ['circle'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["Sample"]


@dataclass
class Sample:
    """One image + prompt to explain.

    id      unique, stable string (the resume key of a run)
    image   a path, a PIL image or an (H, W, 3) uint8 array (anything ``Explainer.explain``
            accepts), or a list of them for a prompt with several image markers; a path is
            opened only when the sample is explained
    prompt  the prompt, with the adapter's image marker where the image goes
    answer  a text to explain instead of generating one (teacher-forced), or None
    masks   ground truth for scoring: a name (category, or any word an answer may use) -> a
            boolean (H, W) mask at the (first) image's resolution (the union of the
            instances); None when the dataset has no masks
    meta    free JSON-serialisable fields, copied into the run's records
    """

    id: str
    image: Any
    prompt: str
    answer: Optional[str] = None
    masks: Optional[Dict[str, np.ndarray]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Sample.id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Sample {self.id!r}: prompt must be a non-empty str")
        if self.answer is not None and not isinstance(self.answer, str):
            raise TypeError(f"Sample {self.id!r}: answer must be a str or None, "
                            f"got {type(self.answer).__name__}")
        if self.masks is not None:
            if not isinstance(self.masks, dict):
                raise TypeError(f"Sample {self.id!r}: masks must be a dict name -> mask")
            for k, m in self.masks.items():
                m = np.asarray(m)
                if m.ndim != 2:
                    raise ValueError(f"Sample {self.id!r}: mask {k!r} has shape {m.shape}, "
                                     "expected (H, W)")
                self.masks[k] = m.astype(bool, copy=False)
