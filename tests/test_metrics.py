"""Offline GLUE metrics: hand-computed values per task type, the `load_metric` fallback, `compute_metrics`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_qvar.metrics import GLUE_TASKS, OfflineMetric, glue_compute, load_metric, make_compute_metrics


def test_cola_matthews_correlation():
    # TP=2, TN=1, FP=1, FN=0: (2·1 − 1·0) / sqrt(3·2·2·1)
    got = glue_compute("cola", [1, 0, 1, 1], [1, 0, 0, 1])
    assert got.keys() == {"matthews_correlation"}
    assert got["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    # 3 of 5 right; TP=2, FP=1, FN=1 -> F1 = 4 / 6
    got = glue_compute(task, [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert got == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


def test_stsb_pearson_and_spearman():
    # Deviations (−1.5, −.5, .5, 1.5) vs (−1.5, .5, −.5, 1.5): covariance sum 4, variance sums 5 -> 0.8; ranks equal values.
    got = glue_compute("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert got.keys() == {"pearson", "spearmanr"}
    assert got["pearson"] == pytest.approx(0.8, abs=1e-6)
    assert got["spearmanr"] == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("task", ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans", "accuracy"])
def test_accuracy_only_tasks(task):
    assert glue_compute(task, [0, 2, 1, 1], [0, 1, 1, 1]) == {"accuracy": 0.75}


def test_values_are_python_floats():
    for task in ("cola", "mrpc", "stsb", "sst2"):
        assert all(type(v) is float for v in glue_compute(task, [0, 1, 1, 0], [0, 1, 0, 0]).values())


def test_unknown_task_is_rejected_with_the_accepted_names():
    with pytest.raises(KeyError, match="sst2"):
        glue_compute("sst-2", [0], [0])
    with pytest.raises(KeyError):
        load_metric("imdb")


@pytest.mark.parametrize("task", [None, "accuracy", "mrpc", "stsb"])
def test_load_metric_falls_back_offline_quickly_with_the_same_values(task):
    metric = load_metric(task)  # offline CI: evaluate has no metric modules -> OfflineMetric
    preds, refs = [1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]
    expected = glue_compute(task or "accuracy", preds, refs)
    got = metric.compute(predictions=preds, references=refs)
    assert got == pytest.approx(expected)
    if isinstance(metric, OfflineMetric):
        assert metric.task == (task or "accuracy")


def test_compute_metrics_classification_adds_combined_score():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # argmax 1, 0, 1, 0
    got = make_compute_metrics("mrpc")(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0, 0])))
    assert got == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "combined_score": (0.75 + 2 / 3) / 2})


def test_compute_metrics_accepts_tuple_predictions_and_regression():
    scores = np.array([[1.0], [2.0], [3.0], [4.0]])
    stsb = make_compute_metrics("stsb", is_regression=True)(EvalPrediction((scores, None), np.array([1.0, 3.0, 2.0, 4.0])))
    assert stsb["pearson"] == pytest.approx(0.8, abs=1e-6) and "combined_score" in stsb
    mse = make_compute_metrics(None, is_regression=True)(EvalPrediction(scores, np.array([1.0, 2.0, 3.0, 6.0])))
    assert mse == {"mse": pytest.approx(1.0)}
    accuracy = make_compute_metrics()(EvalPrediction(np.eye(3), np.array([0, 1, 1])))
    assert accuracy == {"accuracy": pytest.approx(2 / 3)}


def test_every_glue_task_has_a_definition():
    for task in GLUE_TASKS:
        assert glue_compute(task, [0, 1], [0, 1])
