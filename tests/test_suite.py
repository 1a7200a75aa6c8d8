"""The built-in suite: determinism, disjoint splits, sizes, balance, the composition rules, task YAMLs."""
from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from composer import suite
from composer.errors import TaskError

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
SPLITS = ("train", "dev", "test")

# ----------------------------------------------------------------------------- an independent oracle
# Negation is read off the text with a regex written here; polarity and domain come from looking
# the sentence's words up in the suite's word lists (not from how the generator rendered them).

NEGATION_RE = re.compile(r"\b(not|never|hardly)\b|n't\b|\bno longer\b")


def words_of(sentence: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", sentence.lower())


def polarity_lexicon() -> dict[str, str]:
    lex: dict[str, str] = {}
    for pol in suite.POLARITIES:
        adjs = list(suite._ADJ_GENERAL[pol])
        for dom in suite.DOMAINS:
            adjs += suite._ADJ_DOMAIN[dom][pol]
        forms = [f for verb in suite._VERBS[pol] for f in verb]
        for w in adjs + forms:
            assert lex.get(w, pol) == pol, f"{w!r} is both positive and negative"
            lex[w] = pol
    return lex


def domain_lexicon() -> dict[str, str]:
    lex: dict[str, str] = {}
    for dom in suite.DOMAINS:
        nouns = suite._NOUNS_SG[dom] + suite._NOUNS_PL[dom] + suite._HEADS[dom]
        for w in nouns:
            assert lex.get(w, dom) == dom, f"{w!r} belongs to two domains"
            lex[w] = dom
    return lex


POLARITY = polarity_lexicon()
DOMAIN = domain_lexicon()


def oracle(sentence: str) -> tuple[str, str, bool]:
    """(domain, polarity, negated) of a sentence, from its words alone."""
    ws = words_of(sentence)
    pols = {POLARITY[w] for w in ws if w in POLARITY}
    doms = {DOMAIN[w] for w in ws if w in DOMAIN}
    assert len(pols) == 1, f"{sentence!r}: polarity words {pols}"
    assert len(doms) == 1, f"{sentence!r}: domain words {doms}"
    return doms.pop(), pols.pop(), bool(NEGATION_RE.search(sentence.lower()))


def test_oracle_on_hand_written_sentences():
    assert oracle("The soup was delicious.") == ("food", "positive", False)
    assert oracle("I found the plot dull.") == ("film", "negative", False)
    assert oracle("The soup wasn't delicious!") == ("food", "positive", True)
    assert oracle("We no longer hate the app.") == ("tech", "negative", True)
    assert oracle("It was hardly a thrilling match.") == ("sports", "positive", True)


def test_word_lists_do_not_mix_cues():
    neutral = (suite._INTENSIFIERS + [w for m in suite._MODIFIERS.values() for w in m]
               + [w for x in suite._PREFIXES + suite._SUFFIXES_GENERAL for w in words_of(x)]
               + [w for xs in suite._SUFFIXES_DOMAIN.values() for x in xs for w in words_of(x)]
               + [w for e in suite._EXPERIENCERS for w in words_of(e)])
    for w in neutral:
        assert w not in POLARITY, f"neutral word {w!r} is an opinion word"
        assert not NEGATION_RE.search(w), f"neutral word {w!r} reads as a negation"
        # a domain's own closing clause may name its domain ("at dinner"); no other may
    for dom, xs in suite._SUFFIXES_DOMAIN.items():
        for w in (w for x in xs for w in words_of(x)):
            assert DOMAIN.get(w, dom) == dom, f"{dom} clause word {w!r} names {DOMAIN[w]}"


# ----------------------------------------------------------------------------- sizes, balance, splits


@pytest.mark.parametrize("name", suite.SUITE_TASKS)
def test_sizes_balance_and_label_set(name):
    yaml_labels = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())["labels"]
    assert yaml_labels == suite.LABELS[name]
    for split in SPLITS:
        rows = suite.generate(name, split)
        assert len(rows) == suite.SPLIT_SIZES[split]
        assert len(rows) >= (3000 if split == "train" else 500)
        assert all(set(r) == {"sentence", "label"} for r in rows)
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(yaml_labels)
        assert len(set(counts.values())) == 1, f"{name}/{split} unbalanced: {counts}"


@pytest.mark.parametrize("name", suite.SUITE_TASKS)
def test_splits_are_disjoint_and_sentences_distinct(name):
    keys = {s: [r["sentence"].lower().rstrip(".!") for r in suite.generate(name, s)] for s in SPLITS}
    for split, ks in keys.items():
        assert len(ks) == len(set(ks)), f"duplicate sentences in {name}/{split}"
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["dev"]) & set(keys["test"])


def test_no_sentence_crosses_splits_between_tasks_or_seeds():
    where: dict[str, str] = {}
    for name in ("polarity", "negated-polarity"):
        for seed in (0, 1):
            for split in SPLITS:
                for r in suite.generate(name, split, seed):
                    assert where.setdefault(r["sentence"], split) == split


def test_deterministic_given_seed():
    for name in ("negation", "topic-polarity"):
        suite._task.cache_clear()
        suite._pool.cache_clear()
        a = suite.generate(name, "train", seed=3)
        suite._task.cache_clear()
        suite._pool.cache_clear()
        b = suite.generate(name, "train", seed=3)
        assert a == b
        c = suite.generate(name, "train", seed=4)
        assert a != c
        assert len({r["sentence"] for r in a} & {r["sentence"] for r in c}) < len(a) // 10


def test_global_rng_untouched_and_results_not_shared():
    import random

    random.seed(123)
    before = random.random()
    random.seed(123)
    suite._pool.cache_clear()
    suite._task.cache_clear()
    suite.generate("polarity", "dev", seed=9)
    assert random.random() == before
    rows = suite.generate("polarity", "dev", seed=9)
    rows[0]["label"] = "changed"
    assert suite.generate("polarity", "dev", seed=9)[0]["label"] != "changed"


def test_fast():
    for name in suite.SUITE_TASKS:
        suite._pool.cache_clear()
        suite._task.cache_clear()
        t0 = time.perf_counter()
        for split in SPLITS:
            suite.generate(name, split, seed=11)
        assert time.perf_counter() - t0 < 2.0, name


# ----------------------------------------------------------------------------- the composition rules


def test_negated_polarity_is_polarity_xor_negation():
    for split in SPLITS:
        np_rows = suite.generate("negated-polarity", split)
        neg_rows = suite.generate("negation", split)
        assert [r["sentence"] for r in np_rows] == [r["sentence"] for r in neg_rows]
        cells = Counter()
        for r, n in zip(np_rows, neg_rows):
            _, pol, negated = oracle(r["sentence"])
            assert n["label"] == ("negated" if negated else "affirmed"), r["sentence"]
            flipped = {"positive": "negative", "negative": "positive"}[pol]
            assert r["label"] == (flipped if negated else pol), r["sentence"]
            cells[pol, negated] += 1
        assert len(cells) == 4 and len(set(cells.values())) == 1, cells


def test_negation_uses_every_form_and_is_independent_of_polarity():
    rows = suite.generate("negation", "train")
    text = " ".join(r["sentence"].lower() for r in rows if r["label"] == "negated")
    for form in (" not ", "n't ", " never ", " no longer ", " hardly "):
        assert form in text, form
    joint = Counter((r["label"], oracle(r["sentence"])[1]) for r in rows)
    assert len(joint) == 4 and len(set(joint.values())) == 1, joint


@pytest.mark.parametrize("split", SPLITS)
def test_affirmed_tasks_match_the_oracle(split):
    pol, top, both = (suite.generate(n, split) for n in ("polarity", "topic", "topic-polarity"))
    assert [r["sentence"] for r in pol] == [r["sentence"] for r in top] == [r["sentence"] for r in both]
    for p, t, b in zip(pol, top, both):
        domain, polarity, negated = oracle(p["sentence"])
        assert not negated, p["sentence"]
        assert (p["label"], t["label"], b["label"]) == (polarity, domain, f"{domain}-{polarity}")
    joint = Counter((t["label"], p["label"]) for p, t in zip(pol, top))
    assert len(joint) == 2 * len(suite.DOMAINS) and len(set(joint.values())) == 1


def test_decomposition_names_suite_tasks():
    assert suite.DECOMPOSITION == {"negated-polarity": ["polarity", "negation"],
                                   "topic-polarity": ["topic", "polarity"]}
    for target, parts in suite.DECOMPOSITION.items():
        assert {target, *parts} <= set(suite.SUITE_TASKS)


# ----------------------------------------------------------------------------- task YAMLs and errors


@pytest.mark.parametrize("name", suite.SUITE_TASKS)
def test_task_yaml(name):
    spec = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
    assert spec["name"] == name and spec["description"]
    assert spec["data"] == {"source": "builtin", "generator": name}
    assert spec["inputs"] == ["sentence"] and spec["template"] == "{sentence}"
    assert spec["label_field"] == "label" and spec["metric"] == "accuracy" and spec["max_length"] == 64
    n = len(spec["labels"])
    assert len(spec["label_words"]) == len(spec["label_descriptions"]) == n
    assert len(set(spec["label_words"])) == n and len(set(spec["label_descriptions"])) == n
    for w in spec["label_words"]:
        assert w.startswith(" ") and len(w.split()) == 1, w
    generated = {r["label"] for r in suite.generate(name, "dev")}
    assert generated == set(spec["labels"])


def test_task_yaml_loads_through_composer_tasks():
    tasks = pytest.importorskip("composer.tasks")
    taskdata = pytest.importorskip("composer.taskdata")
    spec = tasks.load_task(str(TASKS_DIR / "negated-polarity.yaml"))
    dev = taskdata.load_splits(spec, splits=["dev"])["dev"]
    assert len(dev) == suite.SPLIT_SIZES["dev"]
    assert sorted(set(dev["label"])) == [0, 1]


@pytest.mark.parametrize(("name", "split", "needle"), [
    ("sentiment", "train", "unknown suite generator 'sentiment'"),
    ("polarity", "validation", "unknown split 'validation'"),
])
def test_errors(name, split, needle):
    with pytest.raises(TaskError, match=re.escape(needle)) as err:
        suite.generate(name, split)
    assert "\n" not in str(err.value) and "choose one of" in str(err.value)


def test_bad_seed():
    with pytest.raises(TaskError, match="seed must be an integer"):
        suite.generate("polarity", "train", seed="0")
