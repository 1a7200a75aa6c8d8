"""composer.metrics for generation tasks: values computed by hand, and BLEU against sacrebleu itself."""
import pytest

from composer.errors import TaskError
from composer.metrics import (
    GENERATION_METRICS,
    METRIC_SCALES,
    METRICS,
    compute_generation,
    compute_generations,
    normalize_answer,
    parse_slots,
)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_names_and_scales():
    assert GENERATION_METRICS == ("exact_match", "token_f1", "rouge_l", "bleu", "joint_goal_accuracy", "slot_f1")
    assert not set(GENERATION_METRICS) & set(METRICS)
    assert set(METRIC_SCALES) == set(GENERATION_METRICS) | set(METRICS)
    assert METRIC_SCALES["bleu"] == (0.0, 100.0) and METRIC_SCALES["rouge_l"] == (0.0, 1.0)


def test_squad_normalisation():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_best_over_references():
    preds = ["the Cat", "a dog", "x"]
    refs = [["Cat"], ["dogs", "A  dog."], ["y"]]
    assert compute_generation("exact_match", preds, refs) == pytest.approx(2 / 3)


def test_token_f1():
    # [cat, sat] against [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert compute_generation("token_f1", ["cat sat"], [["the cat sat on the mat"]]) == pytest.approx(2 / 3)
    # best reference wins; order does not matter
    assert compute_generation("token_f1", ["mat the cat"], [["dog", "cat mat"]]) == pytest.approx(1.0)
    # no shared token: 0; repeated tokens count once per match: [a, a] vs [a]: P = 1/2, R = 1
    assert compute_generation("token_f1", ["dog", "b b"], [["cat"], ["b"]]) == pytest.approx((0 + 2 / 3) / 2)


def test_parse_slots_formats():
    assert parse_slots("area=centre; food=Italian") == parse_slots("food: italian;area: centre ")
    assert set(parse_slots("time: 10:30; x=a=b; junk")) == {("time", "10:30"), ("x", "a=b"), ("junk", "")}
    assert parse_slots("none") == parse_slots("") == parse_slots("  None ") and not parse_slots("none")
    assert parse_slots("price range = cheap")[("price range", "cheap")] == 1


def test_joint_goal_accuracy_is_order_insensitive():
    preds = ["area=centre; food=italian", "food=thai", "none", "area: north"]
    refs = [["food=italian; area=centre"], ["food=thai; area=north"], ["none"], ["area=north"]]
    assert compute_generation("joint_goal_accuracy", preds, refs) == pytest.approx(3 / 4)


def test_slot_f1_micro():
    preds = ["a: 1; b: 2", "c: 3"]
    refs = [["a: 1; b: 3"], ["c: 3; d: 4"]]
    # TP = {a:1, c:3} = 2, FP = {b:2} = 1, FN = {b:3, d:4} = 2 -> 2*2 / (2*2 + 1 + 2) = 4/7
    assert compute_generation("slot_f1", preds, refs) == pytest.approx(4 / 7)
    # a pair said twice but filled once: TP 1, FP 1 -> 2/3
    assert compute_generation("slot_f1", ["a: 1; a: 1"], [["a: 1"]]) == pytest.approx(2 / 3)
    assert compute_generation("slot_f1", ["none"], [["none"]]) == 1.0  # nothing to find, nothing invented
    assert compute_generation("slot_f1", ["none"], [["a: 1"]]) == 0.0


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = ["the cat sat on the mat", "there is a dog in the park", "hello"]
    refs = [["the cat sat on the mat", "a cat was on the mat"], ["a dog is in the park"], ["hello there", "hi", "hey"]]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(3)]
    want = sacrebleu.corpus_bleu(preds, streams).score
    assert compute_generation("bleu", preds, refs) == pytest.approx(want)
    assert 0 < want < 100
    assert compute_generation("bleu", ["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert compute_generation("bleu", ["a b c d"], [["w x y z"]]) == pytest.approx(0.0)


def test_rouge_l_f_measure_best_reference_mean():
    pytest.importorskip("rouge_score")
    # LCS("the cat sat down", "the cat sat") = 3: P = 3/4, R = 1, F = 6/7
    assert compute_generation("rouge_l", ["the cat sat down"], [["dog", "the cat sat"]]) == pytest.approx(6 / 7)
    # stemming: "cats" matches "cat"; mean over examples: (1 + 0) / 2
    assert compute_generation("rouge_l", ["cats sat", "zebra"], [["cat sat"], ["lion"]]) == pytest.approx(0.5)


def test_compute_generations_several_and_bare_string_references():
    out = compute_generations(["exact_match", "token_f1"], ["a b", "c"], ["a b", ["d"]])
    assert list(out) == ["exact_match", "token_f1"] and out == {"exact_match": 0.5, "token_f1": 0.5}


@pytest.mark.parametrize(
    "args, match",
    [
        (("meteor", ["a"], [["a"]]), "unknown generation metric 'meteor'; choose one of exact_match"),
        (("exact_match", ["a", "b"], [["a"]]), "2 predictions but 1 references"),
        (("exact_match", [], []), "empty \\(0 examples\\)"),
        (("exact_match", ["a"], [[]]), "references\\[0\\] is \\[\\]; give one or more reference strings"),
        (("exact_match", [None], [["a"]]), "predictions\\[0\\] is None, not a string"),
        (("exact_match", "abc", ["abc"]), "not a single string"),
    ],
)
def test_bad_metric_input(args, match):
    with pytest.raises(TaskError, match=match) as e:
        compute_generation(*args)
    one_line(e)
    with pytest.raises(TaskError):
        compute_generations([args[0]], *args[1:])
