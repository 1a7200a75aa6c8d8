"""composer.metrics: values computed by hand."""
import math

import numpy as np
import pytest

from composer.errors import TaskError
from composer.metrics import METRICS, compute

# argmax predictions [0, 1, 0, 1] against gold [0, 1, 1, 1]: TP=2 TN=1 FP=0 FN=1
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
LABELS = np.array([0, 1, 1, 1])


def test_names():
    assert METRICS == ("accuracy", "f1", "matthews", "pearson", "spearman")


def test_accuracy():
    assert compute("accuracy", PROBS, LABELS) == pytest.approx(3 / 4)


def test_binary_f1_is_f1_of_class_1():
    # 2TP / (2TP + FP + FN) = 4 / 5
    assert compute("f1", PROBS, LABELS) == pytest.approx(0.8)


def test_macro_f1_three_classes():
    probs = np.eye(3)[[0, 1, 2, 2]]  # predictions [0, 1, 2, 2]
    labels = np.array([0, 1, 1, 2])
    # class 0: 1; class 1: 2*1/(2+0+1) = 2/3; class 2: 2*1/(2+1+0) = 2/3
    assert compute("f1", probs, labels) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_matthews_binary():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(2*3*1*2)
    assert compute("matthews", PROBS, LABELS) == pytest.approx(2 / math.sqrt(12))


def test_matthews_perfect_inverse_and_undefined():
    probs = np.eye(2)[[0, 1, 1, 0]]
    assert compute("matthews", probs, np.array([0, 1, 1, 0])) == pytest.approx(1.0)
    assert compute("matthews", probs, np.array([1, 0, 0, 1])) == pytest.approx(-1.0)
    # a constant prediction has no correlation: 0, not nan
    assert compute("matthews", np.eye(2)[[1, 1, 1]], np.array([0, 1, 1])) == 0.0


def test_matthews_multiclass_matches_perfect():
    probs = np.eye(3)[[0, 1, 2, 2]]
    assert compute("matthews", probs, np.array([0, 1, 2, 2])) == pytest.approx(1.0)


def test_correlations_use_expected_bin_value():
    # 2 bins: expected value = p(class 1) = [0.1, 0.2, 0.9] against scores [1, 3, 2]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    scores = np.array([1.0, 3.0, 2.0])
    # spearman: rank differences [0, 1, 1] -> 1 - 6*2 / (3*8) = 0.5
    assert compute("spearman", probs, np.array([0, 1, 1]), scores) == pytest.approx(0.5)
    # pearson: cov = 0.1, |dx| = sqrt(0.38), |dy| = sqrt(2)
    assert compute("pearson", probs, np.array([0, 1, 1]), scores) == pytest.approx(0.1 / math.sqrt(0.76))


def test_correlation_centers_and_default_scores():
    probs = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0.5]])
    labels = np.array([0, 1, 2])
    # without scores the labels stand in: expected values [0, 1, 1.5] vs [0, 1, 2]
    assert compute("spearman", probs, labels) == pytest.approx(1.0)
    centers = np.array([0.0, 4.0, 5.0])  # expected values [0, 4, 4.5] vs scores [0, 1, 5]
    r = compute("pearson", probs, labels, scores=np.array([0.0, 1.0, 5.0]), centers=centers)
    x, y = np.array([0, 4, 4.5]), np.array([0.0, 1.0, 5.0])
    dx, dy = x - x.mean(), y - y.mean()
    expected = (dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy))
    assert r == pytest.approx(expected)


def test_constant_prediction_correlation_is_zero():
    probs = np.full((3, 2), 0.5)
    assert compute("spearman", probs, np.array([0, 1, 1]), np.array([1.0, 2.0, 3.0])) == 0.0


def test_unknown_metric():
    with pytest.raises(TaskError, match="unknown metric 'auc'; choose one of accuracy, f1") as e:
        compute("auc", PROBS, LABELS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.zeros(4), LABELS, r"shape \(4,\); expected \[N, C\]"),
        (PROBS, np.array([0, 1]), "4 rows of probs but 2 labels"),
        (PROBS, np.array([0, 1, 2, 1]), "label 2 outside 0..1"),
        (np.zeros((0, 2)), np.array([], dtype=int), "empty"),
    ],
)
def test_bad_inputs(probs, labels, match):
    with pytest.raises(TaskError, match=match):
        compute("accuracy", probs, labels)
