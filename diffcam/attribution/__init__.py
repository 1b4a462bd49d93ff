"""The attribution engine: Diffusion-CAM raw maps (docs/method.md section 1).

``Explainer`` runs the attribution pass through an adapter and returns ``Explanation`` s.
"""

from .explainer import EmptyAnswerError, Explainer
from .explanation import Explanation
from .gradcam import grad_cam, minmax
from .hooks import BlockHook, HookNotTriggeredError
from .images import load_image
from .layout import Grid, ImageLayout, anyres_layout, merged_layout, single_grid_layout
from .targets import AGGREGATE, STOPWORDS, Target, Word, group_words, is_content_word, \
    resolve_targets

__all__ = ["Explainer", "EmptyAnswerError", "Explanation", "grad_cam", "minmax", "BlockHook",
           "HookNotTriggeredError", "load_image", "Grid", "ImageLayout", "anyres_layout",
           "merged_layout", "single_grid_layout", "Target", "Word", "group_words",
           "is_content_word", "resolve_targets", "STOPWORDS", "AGGREGATE"]
