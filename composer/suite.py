"""The built-in suite: generated English sentence-classification tasks with a known decomposition.

Every sentence is built from known parts, a *cell* ``(domain, polarity, negated)``:

- domain: what the sentence is about (food, film, sports, tech), carried by its subject,
  head noun, adjective and closing clause;
- polarity: the opinion word (an adjective such as "delicious"/"bland", or a verb such as
  "loved"/"hated");
- negated: whether the opinion is negated (not, n't, never, no longer, hardly).

The tasks label the same kind of sentence in different ways, so a composer has a right
answer to find (``DECOMPOSITION``):

=================  ====================  ==========================================
task               sentences             label
=================  ====================  ==========================================
polarity           affirmed only         polarity of the opinion word
topic              affirmed only         domain
topic-polarity     affirmed only         domain-polarity (topic x polarity)
negation           affirmed and negated  affirmed / negated, independent of polarity
negated-polarity   affirmed and negated  polarity XOR negated ("not delicious" -> negative)
=================  ====================  ==========================================

Tasks on affirmed sentences share one pool per seed, and so do the two tasks on mixed
sentences: with one seed, ``polarity``, ``topic`` and ``topic-polarity`` label the very
same sentences. Every split is balanced over its cells (hence over labels, and each label
is independent of the other parts). A sentence's split is fixed by a hash of its text, so
no sentence is in two splits, of one task or of two tasks, whatever the seed.

``generate(name, split, seed)`` returns ``[{"sentence": str, "label": str}, ...]``.
"""
from __future__ import annotations

import functools
import hashlib
import random

from composer.errors import TaskError

SUITE_TASKS: list[str] = ["polarity", "negation", "negated-polarity", "topic", "topic-polarity"]
"""Names accepted by ``generate`` (and by ``data.generator`` in a builtin task YAML)."""

DECOMPOSITION: dict[str, list[str]] = {
    "negated-polarity": ["polarity", "negation"],
    "topic-polarity": ["topic", "polarity"],
}
"""Composed task -> the suite tasks it is made of (negated-polarity = polarity XOR negation)."""

DOMAINS: tuple[str, ...] = ("food", "film", "sports", "tech")
POLARITIES: tuple[str, ...] = ("negative", "positive")

LABELS: dict[str, list[str]] = {
    "polarity": list(POLARITIES),
    "negation": ["affirmed", "negated"],
    "negated-polarity": list(POLARITIES),
    "topic": list(DOMAINS),
    "topic-polarity": [f"{d}-{p}" for d in DOMAINS for p in POLARITIES],
}
"""Label strings of each task, in the order of its task YAML."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPLIT_SIZES: dict[str, int] = {"train": 4000, "dev": 800, "test": 800}
"""Examples per split (divisible by 16, the most cells a task has, so every cell gets as many)."""

_SPLIT_BUCKETS = {0: "train", 1: "train", 2: "train", 3: "train", 4: "train", 5: "dev", 6: "test"}
"""hash(sentence) % 7 -> split: 5:1:1, the ratio of SPLIT_SIZES."""

# ----------------------------------------------------------------------------- word lists

# Subjects: singular and plural nouns, with neutral modifiers that fit every noun.
_NOUNS_SG = {
    "food": ["soup", "pasta", "pizza", "salad", "steak", "burger", "curry", "sushi", "bread", "cake",
             "dessert", "coffee", "sandwich", "chicken", "sauce", "omelette"],
    "film": ["movie", "film", "plot", "ending", "script", "story", "acting", "soundtrack", "sequel",
             "dialogue", "cast", "director", "villain", "trailer"],
    "sports": ["match", "game", "team", "coach", "season", "final", "race", "defense", "goalkeeper",
               "striker", "tournament", "league", "referee", "midfield"],
    "tech": ["phone", "laptop", "app", "camera", "battery", "screen", "keyboard", "update", "software",
             "tablet", "printer", "charger", "website", "router"],
}
_NOUNS_PL = {
    "food": ["noodles", "fries", "dumplings", "pancakes", "tacos", "cookies"],
    "film": ["characters", "jokes", "scenes", "actors", "visuals"],
    "sports": ["players", "tactics", "defenders", "substitutes", "strikers"],
    "tech": ["headphones", "speakers", "settings", "controls", "apps"],
}
_MODIFIERS = {
    "food": ["new", "homemade", "house", "vegan"],
    "film": ["new", "latest", "whole", "original"],
    "sports": ["home", "local", "new"],
    "tech": ["new", "latest", "default"],
}
# Head nouns for "it was a <adj> <head>".
_HEADS = {
    "food": ["meal", "dish", "dinner", "lunch", "breakfast", "snack"],
    "film": ["movie", "film", "show", "documentary", "comedy", "drama"],
    "sports": ["game", "match", "season", "race", "performance", "contest"],
    "tech": ["device", "gadget", "phone", "laptop", "app", "tool"],
}
# Opinion adjectives: general ones, and ones that belong to a domain.
_ADJ_GENERAL = {
    "positive": ["good", "great", "excellent", "wonderful", "fantastic", "amazing", "superb",
                 "brilliant", "lovely", "impressive", "solid", "enjoyable"],
    "negative": ["bad", "awful", "terrible", "poor", "horrible", "disappointing", "dreadful",
                 "weak", "nasty", "unpleasant", "pointless", "annoying"],
}
_ADJ_DOMAIN = {
    "food": {"positive": ["delicious", "tasty", "fresh", "rich", "satisfying", "tender"],
             "negative": ["bland", "stale", "greasy", "dry", "burnt", "salty"]},
    "film": {"positive": ["gripping", "funny", "moving", "clever", "beautiful", "touching"],
             "negative": ["dull", "boring", "predictable", "confusing", "silly", "stupid"]},
    "sports": {"positive": ["exciting", "thrilling", "dominant", "sharp", "inspiring", "strong"],
               "negative": ["sloppy", "slow", "lazy", "clumsy", "chaotic", "careless"]},
    "tech": {"positive": ["fast", "reliable", "responsive", "sleek", "intuitive", "powerful"],
             "negative": ["broken", "unreliable", "awkward", "unstable", "fragile", "useless"]},
}
# Opinion verbs as (base, third person singular, past).
_VERBS = {
    "positive": [("love", "loves", "loved"), ("enjoy", "enjoys", "enjoyed"), ("like", "likes", "liked"),
                 ("appreciate", "appreciates", "appreciated")],
    "negative": [("hate", "hates", "hated"), ("dislike", "dislikes", "disliked"),
                 ("detest", "detests", "detested"), ("regret", "regrets", "regretted")],
}
_BE = ("be", "is", "was")
_FIND = ("find", "finds", "found")
_LINKING = {
    "food": [("taste", "tastes", "tasted"), ("look", "looks", "looked"), ("seem", "seems", "seemed")],
    "film": [("seem", "seems", "seemed"), ("feel", "feels", "felt")],
    "sports": [("look", "looks", "looked"), ("seem", "seems", "seemed")],
    "tech": [("feel", "feels", "felt"), ("seem", "seems", "seemed"), ("look", "looks", "looked")],
}
# People who hold the opinion; all take the plural verb form ("I like", "we like").
_EXPERIENCERS = ["I", "I", "I", "we", "my friends", "my parents", "my friends and I", "my coworkers"]
_PRONOUNS = ["it", "this", "that"]
_DETERMINERS_SG = ["the", "the", "the", "this", "that", "their", "our", "my"]
_DETERMINERS_PL = ["the", "the", "the", "these", "those", "their", "our", "my"]
_INTENSIFIERS = ["very", "really", "truly", "extremely", "incredibly"]

# How the opinion is negated, and the affirmed adverbs that stand in the same place, so that
# "an extra word next to the verb" is no cue for negation.
NEGATIONS: tuple[str, ...] = ("not", "n't", "never", "no longer", "hardly")
_AFFIRMATIONS = ("", "", "always", "still", "definitely")

_PREFIXES = ["", "", "", "", "", "honestly, ", "overall, ", "to be honest, ", "in my opinion, ",
             "frankly, ", "I think ", "I have to say ", "in the end, ", "to be fair, "]
_SUFFIXES_GENERAL = ["", "", "", "", " this time", " last week", ", as expected", ", to my surprise",
                     ", as my friend said", " if you ask me"]
_SUFFIXES_DOMAIN = {
    "food": [" at dinner", " at the new cafe", " at lunch today", " at that little place downtown",
             " at the restaurant", " for the price"],
    "film": [" at the cinema", " in the theater", " last night", " on the first watch",
             " in the second half", " for a family night"],
    "sports": [" last weekend", " at the stadium", " this season", " in the second half", " on tv",
               " in the playoffs"],
    "tech": [" after a week of use", " at work", " out of the box", " after the update", " for the price",
             " on the train"],
}
_PAST_TIMES = ("last", "today", "first watch")

# ----------------------------------------------------------------------------- sentence parts


def _noun_phrase(rng: random.Random, domain: str) -> tuple[str, bool]:
    """A subject such as "the homemade soup"; returns (text, plural)."""
    plural = rng.random() < 0.3
    noun = rng.choice(_NOUNS_PL[domain] if plural else _NOUNS_SG[domain])
    if rng.random() < 0.3:
        noun = f"{rng.choice(_MODIFIERS[domain])} {noun}"
    det = rng.choice(_DETERMINERS_PL if plural else _DETERMINERS_SG)
    return f"{det} {noun}", plural


def _verb_phrase(verb: tuple[str, str, str], plural: bool, tense: str, mode: str) -> str:
    """The finite verb with its negation or affirmed adverb: "was not", "didn't taste", "never loved"."""
    if verb is _BE:
        cop = {("past", False): "was", ("past", True): "were",
               ("present", False): "is", ("present", True): "are"}[tense, plural]
        return cop + "n't" if mode == "n't" else f"{cop} {mode}".rstrip()
    base, s3, past = verb
    if mode in ("not", "n't"):
        aux = "did" if tense == "past" else ("do" if plural else "does")
        return f"{aux} not {base}" if mode == "not" else f"{aux}n't {base}"
    main = past if tense == "past" else (base if plural else s3)
    return f"{mode} {main}".lstrip()


def _adjective(rng: random.Random, domain: str, polarity: str, mode: str) -> str:
    adj = rng.choice(_ADJ_GENERAL[polarity] + _ADJ_DOMAIN[domain][polarity])
    # "hardly very good" and "definitely really good" are not English; one form of each side
    # goes without, so an intensifier says nothing about negation
    if mode not in ("hardly", "definitely") and rng.random() < 0.35:
        adj = f"{rng.choice(_INTENSIFIERS)} {adj}"
    return adj


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(rng: random.Random, domain: str, polarity: str, negated: bool) -> str:
    """One sentence of the cell (domain, polarity, negated)."""
    mode = rng.choice(NEGATIONS if negated else _AFFIRMATIONS)
    tense = "past" if rng.random() < 0.65 else "present"
    kind = rng.choices(["copula", "find", "linking", "head", "verb"], weights=[35, 15, 15, 15, 20])[0]
    if kind == "copula":  # the soup was not delicious
        np_, plural = _noun_phrase(rng, domain)
        core = f"{np_} {_verb_phrase(_BE, plural, tense, mode)} {_adjective(rng, domain, polarity, mode)}"
    elif kind == "find":  # I never found the plot dull
        np_, _ = _noun_phrase(rng, domain)
        who = rng.choice(_EXPERIENCERS)
        adj = _adjective(rng, domain, polarity, mode)
        core = f"{who} {_verb_phrase(_FIND, True, tense, mode)} {np_} {adj}"
    elif kind == "linking":  # the fries tasted greasy
        np_, plural = _noun_phrase(rng, domain)
        verb = rng.choice(_LINKING[domain])
        core = f"{np_} {_verb_phrase(verb, plural, tense, mode)} {_adjective(rng, domain, polarity, mode)}"
    elif kind == "head":  # it wasn't a gripping movie
        adj = _adjective(rng, domain, polarity, mode)
        vp = _verb_phrase(_BE, False, tense, mode)
        core = f"{rng.choice(_PRONOUNS)} {vp} {_article(adj)} {adj} {rng.choice(_HEADS[domain])}"
    else:  # we no longer enjoy the pasta
        np_, _ = _noun_phrase(rng, domain)
        verb = rng.choice(_VERBS[polarity])
        core = f"{rng.choice(_EXPERIENCERS)} {_verb_phrase(verb, True, tense, mode)} {np_}"
    suffixes = _SUFFIXES_GENERAL + _SUFFIXES_DOMAIN[domain]
    if tense == "present":  # "this is a great app last week" is not English
        suffixes = [x for x in suffixes if not any(w in x for w in _PAST_TIMES)]
    suffix = rng.choice(suffixes)
    text = f"{rng.choice(_PREFIXES)}{core}{suffix}{'!' if rng.random() < 0.15 else '.'}"
    return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------- pools and labels


def _key(sentence: str) -> str:
    """What makes two sentences the same: "The soup was bad." and "the soup was bad!" are one."""
    return sentence.lower().rstrip(".!")


def _split_of(sentence: str) -> str:
    digest = hashlib.blake2b(_key(sentence).encode("utf-8"), digest_size=8).digest()
    return _SPLIT_BUCKETS[int.from_bytes(digest, "big") % len(_SPLIT_BUCKETS)]


def _cells(mixed: bool) -> list[tuple[str, str, bool]]:
    negs = (False, True) if mixed else (False,)
    return [(d, p, n) for d in DOMAINS for p in POLARITIES for n in negs]


@functools.lru_cache(maxsize=16)
def _pool(mixed: bool, seed: int) -> dict[str, tuple[tuple[str, tuple[str, str, bool]], ...]]:
    """split -> ((sentence, cell), ...): SPLIT_SIZES[split] sentences, as many per cell, shuffled.

    Draws cell after cell until every (cell, split) quota is full; a sentence goes to the split
    its hash names, or is dropped when that quota is full or the sentence was drawn before.
    """
    family = "mixed" if mixed else "affirmed"
    rng = random.Random(f"prompt-composer/suite/{family}/{seed}")
    cells = _cells(mixed)
    quota = {s: SPLIT_SIZES[s] // len(cells) for s in SPLITS}
    out: dict[str, list[tuple[str, tuple[str, str, bool]]]] = {s: [] for s in SPLITS}
    filled = {(c, s): 0 for c in cells for s in SPLITS}
    seen: set[str] = set()
    open_cells = list(cells)
    draws, limit = 0, 100 * sum(SPLIT_SIZES.values())
    while open_cells:
        for cell in list(open_cells):
            draws += 1
            sentence = _sentence(rng, *cell)
            key = _key(sentence)
            if key in seen:
                continue
            seen.add(key)
            split = _split_of(sentence)
            if filled[cell, split] < quota[split]:
                filled[cell, split] += 1
                out[split].append((sentence, cell))
                if all(filled[cell, s] == quota[s] for s in SPLITS):
                    open_cells.remove(cell)
        if draws > limit:  # a word list too small for the split sizes; not reachable with the lists above
            raise TaskError(f"suite generator for {family} sentences stalled after {draws} draws; "
                            "enlarge the word lists in composer/suite.py or lower SPLIT_SIZES")
    for split in SPLITS:
        rng.shuffle(out[split])
    return {s: tuple(v) for s, v in out.items()}


def _label(name: str, cell: tuple[str, str, bool]) -> str:
    domain, polarity, negated = cell
    if name == "polarity":
        return polarity
    if name == "negation":
        return "negated" if negated else "affirmed"
    if name == "negated-polarity":
        return POLARITIES[(polarity == "positive") ^ negated]
    if name == "topic":
        return domain
    return f"{domain}-{polarity}"  # topic-polarity


@functools.lru_cache(maxsize=64)
def _task(name: str, seed: int) -> dict[str, tuple[tuple[str, str], ...]]:
    pool = _pool(name in ("negation", "negated-polarity"), seed)
    return {s: tuple((sent, _label(name, cell)) for sent, cell in rows) for s, rows in pool.items()}


def generate(name: str, split: str, seed: int = 0) -> list[dict[str, str]]:
    """The examples of one split of a suite task: ``[{"sentence": str, "label": str}, ...]``.

    Deterministic given ``seed``; balanced over labels; no sentence is in two splits. The
    pool of a (task, seed) is built once per process and cached; each call returns fresh dicts.
    """
    if name not in SUITE_TASKS:
        raise TaskError(f"unknown suite generator {name!r}; choose one of {', '.join(SUITE_TASKS)}")
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r} for suite generator {name}; "
                        f"choose one of {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskError(f"suite seed must be an integer, got {seed!r}")
    return [{"sentence": s, "label": lab} for s, lab in _task(name, seed)[split]]
