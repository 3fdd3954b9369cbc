"""Quality yardstick: held-out bits per byte and perplexity (`evaluate`), and the evaluation texts
shipped with moeinfer (`english`, `python`) or read from a user's file or folder (`load_dataset`)."""

from __future__ import annotations

from moeinfer.eval.datasets import DATASETS, EvalText, load_dataset
from moeinfer.eval.perplexity import EvalResult, evaluate, window_spans

__all__ = ["DATASETS", "EvalResult", "EvalText", "evaluate", "load_dataset", "window_spans"]
