"""Dataset runs: explain every sample of a dataset into a resumable, crash-safe run folder.

* :func:`run_dataset` -- batches through one :class:`~diffcam.Explainer`, committed shard by
  shard (:mod:`diffcam.run.store`); rerun the same call to resume; ``worker=(i, n)`` splits a
  dataset over n processes or machines sharing the folder; :func:`run_dataset_ray` starts those
  workers as Ray tasks;
* :func:`open_dataset` -- dataset specs (``"shapes:test:0:100"``, ``"coco:PATH"``);
* :func:`summarize` / :func:`format_summary` -- counts and the paper's scores of a run folder;
  :func:`score_rows` / :func:`write_scores` -- one row per scored map (CSV, Parquet, DataFrame);
  :func:`function_word_rows` -- one row per function-word map (the TAM protocol's Func-IoU);
  :func:`gallery` -- the best and worst maps as PNG strips and an HTML page;
* :class:`RunStore` -- read a run folder: records, maps, errors.

Command line: ``diffcam run DATASET --out DIR`` and ``diffcam report DIR``.  Nothing heavy is
imported until a run starts.
"""

from .gallery import gallery, scored_maps
from .report import format_summary, function_word_rows, score_rows, summarize, write_scores
from .runner import Progress, match_mask, run_dataset
from .ray_engine import run_dataset_ray
from .sources import Dataset, open_dataset
from .store import RunStore, SettingsMismatch

__all__ = ["gallery", "scored_maps", "run_dataset", "run_dataset_ray", "open_dataset", "Dataset", "summarize",
           "format_summary", "score_rows", "function_word_rows", "write_scores", "RunStore", "SettingsMismatch", "match_mask", "Progress"]
