"""Task metrics: one number from predicted class probabilities, or from generated text.

Shapes: N examples, C classes.

Generation tasks (``type: generation``) are scored on strings:
``compute_generation(metric, predictions [N] str, references [N] list[str]) -> float``
and ``compute_generations(metrics, predictions, references) -> {metric: float}``.
See ``GENERATION_METRICS`` and ``METRIC_SCALES`` for the names and their ranges.

``compute(metric, probs [N, C], labels [N], scores=None [N]) -> float``

Classification metrics (accuracy, f1, matthews) use ``argmax(probs)`` as the
prediction. Correlation metrics (pearson, spearman) serve regression tasks that were
binned into C classes (``regression:`` in a task YAML): the prediction is the expected
bin value ``probs @ centers`` (``centers`` defaults to ``arange(C)``, which gives the
same spearman as any increasing centers) compared with the gold float ``scores``;
without ``scores`` the bin indices ``labels`` stand in for them.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from composer.errors import TaskError

METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews", "pearson", "spearman")
"""Metric names a task YAML may use."""

CORRELATION_METRICS: tuple[str, ...] = ("pearson", "spearman")

GENERATION_METRICS: tuple[str, ...] = ("exact_match", "token_f1", "rouge_l", "bleu", "joint_goal_accuracy",
                                       "slot_f1")
"""Metric names a generation task YAML may use (``metric:`` / ``metrics:``)."""

METRIC_SCALES: dict[str, tuple[float, float]] = {
    **{m: (0.0, 1.0) for m in ("accuracy", "f1", "exact_match", "token_f1", "rouge_l", "joint_goal_accuracy",
                               "slot_f1")},
    **{m: (-1.0, 1.0) for m in ("matthews", "pearson", "spearman")},
    "bleu": (0.0, 100.0),  # sacrebleu's scale, so numbers compare with published BLEU
}
"""(lowest, highest) value of each metric; higher is better for all of them."""


def _as_arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2:
        raise TaskError(f"metric input probs has shape {probs.shape}; expected [N, C]")
    if probs.shape[0] != labels.shape[0]:
        raise TaskError(
            f"metric input has {probs.shape[0]} rows of probs but {labels.shape[0]} labels; "
            "pass one label per row"
        )
    if probs.shape[0] == 0:
        raise TaskError("metric input is empty (0 examples); evaluate on a non-empty split")
    return probs, labels


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``pred [N]`` equal to ``labels [N]``."""
    return float(np.mean(pred == labels))


def f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Binary F1 of class 1 when ``num_classes == 2``, else the macro average over classes.

    A class with no predicted and no gold examples scores 0 (the sklearn convention).
    """
    classes = [1] if num_classes == 2 else list(range(num_classes))
    scores = []
    for c in classes:
        tp = float(np.sum((pred == c) & (labels == c)))
        fp = float(np.sum((pred == c) & (labels != c)))
        fn = float(np.sum((pred != c) & (labels == c)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom > 0 else 0.0)
    return float(np.mean(scores))


def matthews(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Matthews correlation (the multi-class R_K form); 0 when undefined (one class only)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.float64)  # [C gold, C pred]
    np.add.at(cm, (labels, pred), 1.0)
    t = cm.sum(axis=1)  # [C] gold counts
    p = cm.sum(axis=0)  # [C] predicted counts
    c = np.trace(cm)
    s = cm.sum()
    cov_yp = c * s - t @ p
    cov_yy = s * s - t @ t
    cov_pp = s * s - p @ p
    denom = np.sqrt(cov_yy * cov_pp)
    return float(cov_yp / denom) if denom > 0 else 0.0


def _correlation(metric: str, pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy import stats

    # a constant vector has no correlation; scipy warns and returns nan, we say 0
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0
    if metric == "pearson":
        return float(stats.pearsonr(pred, gold)[0])
    return float(stats.spearmanr(pred, gold)[0])


def compute(
    metric: str,
    probs: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    centers: np.ndarray | None = None,
) -> float:
    """One metric value.

    Args:
        metric: one of ``METRICS``.
        probs: [N, C] class probabilities (or any scores whose argmax is the prediction).
        labels: [N] int gold class indices.
        scores: [N] float gold values for correlation metrics (regression tasks);
            defaults to ``labels``.
        centers: [C] the value each class stands for in correlation metrics
            (e.g. ``TaskSpec.bin_centers()``); defaults to ``arange(C)``.

    Returns:
        The metric as a float (accuracy/f1 in [0, 1], matthews/pearson/spearman in [-1, 1]).
    """
    if metric not in METRICS:
        raise TaskError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    probs, labels = _as_arrays(probs, labels)
    N, C = probs.shape
    if labels.min() < 0 or labels.max() >= C:
        raise TaskError(
            f"metric input has label {int(labels.max() if labels.max() >= C else labels.min())} "
            f"outside 0..{C - 1} for probs with {C} classes; pass class indices"
        )
    if metric in CORRELATION_METRICS:
        values = np.arange(C, dtype=np.float64) if centers is None else np.asarray(centers, np.float64)
        if values.shape != (C,):
            raise TaskError(f"metric centers have shape {values.shape}; expected [{C}] (one per class)")
        pred = probs @ values  # [N] expected value
        gold = labels.astype(np.float64) if scores is None else np.asarray(scores, np.float64).reshape(-1)
        if gold.shape != (N,):
            raise TaskError(f"metric scores have shape {gold.shape}; expected [{N}] (one per row)")
        return _correlation(metric, pred, gold)
    pred = probs.argmax(axis=1)  # [N]
    if metric == "accuracy":
        return accuracy(pred, labels)
    if metric == "f1":
        return f1(pred, labels, C)
    return matthews(pred, labels, C)


# ----------------------------------------------------------------------------- generation metrics
# Shapes: N examples; predictions [N] strings, references [N] lists of one or more strings.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)  # both empty: 1; one empty: 0 (as the SQuAD v2 script does)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to some reference after ``normalize_answer`` (SQuAD EM), in [0, 1]."""
    return float(np.mean([max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
                          for p, refs in zip(predictions, references)]))


def token_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """SQuAD token F1: bag-of-tokens F1 against the best reference, averaged over examples, in [0, 1]."""
    return float(np.mean([max(_token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]))


_EMPTY_STATE = {"", "none"}


def parse_slots(text: str) -> Counter:
    """ "area=centre; food=italian" or "area: centre; food: italian" -> Counter({(slot, value): count}).

    Items are split on ";"; each item on its first "=" or ": " (whichever comes first, so values may
    hold either: "time: 10:30"). Slots and values are lowercased with whitespace collapsed; "none" or ""
    is the empty state. An item without a separator counts as (item, "") so a malformed prediction is
    a wrong pair rather than an error.
    """
    pairs: Counter = Counter()
    if " ".join(text.lower().split()) in _EMPTY_STATE:
        return pairs
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        cuts = [i for i in (item.find("="), item.find(": ")) if i >= 0]
        if cuts:
            cut = min(cuts)
            width = 1 if item[cut] == "=" else 2
            slot, value = item[:cut], item[cut + width:]
        else:
            slot, value = item, ""
        pairs[(" ".join(slot.lower().split()), " ".join(value.lower().split()))] += 1
    return pairs


def joint_goal_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of turns whose predicted state equals a reference state as a set of slot=value pairs.

    Order and repeats do not matter ("a=1; b=2" == "b=2; a=1"); "none" is the empty state. In [0, 1].
    """
    return float(np.mean([max(float(set(parse_slots(p)) == set(parse_slots(r))) for r in refs)
                          for p, refs in zip(predictions, references)]))


def slot_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Micro F1 over slot=value pairs (as multisets: a slot filled twice counts twice), in [0, 1].

    Scored against each example's first reference. With no pair predicted and none in the
    references the score is 1 (nothing to find, nothing invented).
    """
    tp = fp = fn = 0
    for p, refs in zip(predictions, references):
        pred, gold = parse_slots(p), parse_slots(refs[0])
        hit = sum((pred & gold).values())
        tp += hit
        fp += sum(pred.values()) - hit
        fn += sum(gold.values()) - hit
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU from sacrebleu (its default 13a tokenisation, multi-reference), in [0, 100]."""
    # sacrebleu is imported here, not at the top, so classification-only users never pay for it
    import sacrebleu

    R = max(len(refs) for refs in references)
    # sacrebleu wants reference streams [R][N]; None pads examples with fewer references (stream 0
    # always holds every example's first reference, which sacrebleu requires)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(R)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure from rouge-score (Porter stemming), best over references, mean over examples.

    In [0, 1].
    """
    # rouge_score (and nltk, its dependency) is imported lazily, as sacrebleu above
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score_multi(list(refs), p)["rougeL"].fmeasure
                          for p, refs in zip(predictions, references)]))


_GENERATION = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "bleu": bleu,
               "joint_goal_accuracy": joint_goal_accuracy, "slot_f1": slot_f1}


def _check_texts(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TaskError("metric input must be lists (predictions [N] str, references [N] list[str]), "
                        "not a single string; wrap it in a list")
    if len(predictions) != len(references):
        raise TaskError(f"metric input has {len(predictions)} predictions but {len(references)} references; "
                        "pass one list of references per prediction")
    if len(predictions) == 0:
        raise TaskError("metric input is empty (0 examples); evaluate on a non-empty split")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r or not all(isinstance(x, str) for x in r):
            raise TaskError(f"metric input: references[{i}] is {r!r}; give one or more reference strings")
    bad = next((i for i, p in enumerate(predictions) if not isinstance(p, str)), None)
    if bad is not None:
        raise TaskError(f"metric input: predictions[{bad}] is {predictions[bad]!r}, not a string")
    return refs


def compute_generation(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """One generation metric.

    Args:
        metric: one of ``GENERATION_METRICS``.
        predictions: [N] generated strings.
        references: [N] lists of reference strings (one or more per example; a bare string
            counts as a list of one).

    Returns:
        The metric as a float: bleu in [0, 100] (sacrebleu's scale), every other in [0, 1]
        (``METRIC_SCALES``).
    """
    if metric not in _GENERATION:
        raise TaskError(f"unknown generation metric {metric!r}; choose one of {', '.join(GENERATION_METRICS)}")
    return _GENERATION[metric](list(predictions), _check_texts(predictions, references))


def compute_generations(metrics: Sequence[str], predictions: Sequence[str],
                        references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Several generation metrics at once: {metric: value}, in the order given."""
    unknown = [m for m in metrics if m not in _GENERATION]
    if unknown:
        raise TaskError(f"unknown generation metric {unknown[0]!r}; choose one of {', '.join(GENERATION_METRICS)}")
    refs = _check_texts(predictions, references)
    return {m: _GENERATION[m](list(predictions), refs) for m in metrics}
