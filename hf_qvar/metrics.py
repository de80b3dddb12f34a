"""GLUE and accuracy metrics that work offline, with the keys and definitions of `evaluate`'s ``glue`` metric.

`evaluate` 0.4.6 ships no metric modules and fails at once without the Hub, so the examples fall back to
the scikit-learn / scipy computation below; with the Hub reachable they use `evaluate` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

logger = logging.getLogger(__name__)

GLUE_TASKS = (
    "cola", "mnli", "mnli_matched", "mnli_mismatched", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli", "hans",
)


def glue_compute(task: str, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """The ``glue`` metric of `evaluate` for `task`: Matthews correlation (cola), Pearson/Spearman (stsb),
    accuracy + F1 (mrpc, qqp) or accuracy (the others, and ``"accuracy"``).

    Args:
        task (`str`): A GLUE config name (see `GLUE_TASKS`) or ``"accuracy"``.
        predictions: Predicted class ids (scores for stsb).
        references: Gold class ids (scores for stsb).
    """
    _check_task(task)
    p, r = np.asarray(predictions), np.asarray(references)
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(r, p))}
    if task == "stsb":
        # evaluate's glue metric declares stsb features as float32.
        p, r = p.astype(np.float32), r.astype(np.float32)
        return {"pearson": float(pearsonr(p, r)[0]), "spearmanr": float(spearmanr(p, r)[0])}
    accuracy = float((p == r).mean())
    if task in ("mrpc", "qqp"):
        return {"accuracy": accuracy, "f1": float(f1_score(r, p))}
    return {"accuracy": accuracy}


def _check_task(task: str) -> None:
    if task not in GLUE_TASKS and task != "accuracy":
        raise KeyError(f"Unknown GLUE task {task!r}; expected one of {GLUE_TASKS} or 'accuracy'.")


class OfflineMetric:
    """Stand-in for an `evaluate.EvaluationModule`: the same ``compute(predictions=, references=)`` call."""

    def __init__(self, task: str):
        _check_task(task)  # fail at construction, not at the first evaluation
        self.task = task

    def compute(self, *, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
        return glue_compute(self.task, predictions, references)

    def __repr__(self) -> str:
        return f"OfflineMetric({self.task!r})"


def load_metric(task: str | None = None) -> Any:
    """`evaluate.load("glue", task)` (or ``evaluate.load("accuracy")`` for ``None``/``"accuracy"``) when the
    metric module can be loaded, else an `OfflineMetric` computing the same values.
    """
    name = task or "accuracy"
    offline = OfflineMetric(name)  # also rejects unknown task names before any download attempt
    try:
        import evaluate

        return evaluate.load("accuracy") if name == "accuracy" else evaluate.load("glue", name)
    except (ImportError, OSError, ValueError) as error:  # offline: FileNotFoundError / ConnectionError at once
        logger.info("Using the offline %s metric (evaluate could not load it: %s).", name, error)
        return offline


def make_compute_metrics(task: str | None = None, is_regression: bool = False) -> Callable[[Any], dict[str, float]]:
    """`Trainer` ``compute_metrics`` for classification logits (argmax) or a regression score.

    GLUE tasks report the task's metrics plus ``combined_score`` (their mean) when there are several, as
    transformers' run_glue.py does; other regression data reports ``mse``; everything else ``accuracy``.
    """
    metric = load_metric(task) if task is not None or not is_regression else None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=-1)
        if metric is None:
            return {"mse": float(((predictions - prediction.label_ids) ** 2).mean())}
        result = metric.compute(predictions=predictions, references=prediction.label_ids)
        result = {key: float(value) for key, value in result.items()}
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics
