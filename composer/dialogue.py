"""Readers for the dialogue and text-to-text datasets (ATIS, SNIPS, E2E NLG, WOZ 2.0, MultiWOZ 2.1, SGD, SQuAD).

Each is a file ``format`` of ``data.source: files`` (composer.taskdata calls ``read``), so a task YAML
names its files relative to the data directory like any other task::

    data:
      source: files
      format: woz
      options: {view: state, history: 4}    # per-split entries may add their own `options`
      splits: {train: woz2_neural-belief-tracker/WOZ2.0/woz_train_en.json, ...}

Archives are read in place (tarfile / zipfile, member by member into memory); nothing is unpacked.
Every reader returns raw rows (dicts of column -> str, or list[str] for the multi-reference columns);
the task picks its input and target fields among them.

``part: [lo, hi]`` (woz, multiwoz, sgd, squad) keeps the dialogues (squad: articles) whose rank in a
seeded order falls in ``[lo, hi)`` of the whole: the way to carve train/dev out of a set that has no
such split without putting turns of one dialogue (or questions on one paragraph) on both sides. The
order is by md5 of ``"{part_seed}:{id}"``, so it depends on neither file order nor Python version.

Formats, their options and the columns of a row:

``slu``  (ATIS / SNIPS, ``word:TAG ... <=> INTENT``; a token splits on its last ':')
    utterance, intent (the first of ``a;b`` multi-intents), intents (all, ``;``-joined),
    slots (``"slot: value; slot: value"`` from the IOB2 tags in utterance order, ``"none"`` when empty).
``e2e``  (the official CSV ``mr,ref``, or the tokenised ``e2e_aligned.tar.gz`` of neural-template-gen)
    options: ``group`` (false: one row per (MR, reference) pair; true: one row per MR), ``member``
    (tar only: ``train`` reads ``e2e_aligned/src_train.txt`` + ``e2e_aligned/train.txt``).
    mr (``"name[The Eagle], food[French], ..."``, the official form also for the tarball), ref (one
    reference; with ``group`` the first), references (every reference of the MR). The tarball's text
    is detokenised (``£ 30 .`` -> ``£30.``) so it looks like the CSV references it is scored against.
``woz``  (WOZ 2.0 JSON of the Neural Belief Tracker)
    options: ``view`` (``state``: one row per user turn; ``response``: one row per user turn that the
    data has a system reply to, i.e. all but each dialogue's last), ``history`` (exchanges kept).
    history (``"system: ...\\nuser: ..."`` lines, the last ``history`` exchanges), user, state (the
    accumulated inform slots ``"area=centre; food=italian"``, sorted, ``"none"`` when empty), requests
    (``"address, phone"`` requested this turn, or ``"none"``), reply (response view), dialogue_id, turn.
``multiwoz``  (ConvLab-2's MultiWOZ 2.1 ``val.json.zip`` / ``test.json.zip``)
    options: ``view`` (state | response), ``history``, ``member`` (default: the zip's only .json).
    history, user, state (``"hotel-area=east; hotel-book people=2"`` from the following system
    turn's metadata, sorted; ``dontcare`` variants unified), previous_state (the same after the
    previous user turn; ``"none"`` at the first), reply, dialogue_id, turn.
``sgd``  (Schema-Guided Dialogue ``dialogues_NNN.json``, or a folder: every dialogues_*.json in it)
    options: ``view`` (state | response), ``history``.
    history, user, state (``"city=fremont; cuisine=asian fusion"`` of the user frames, the first
    value of each slot, sorted), intent (the active intent of the first frame, ``NONE`` if none),
    service, reply (the next system turn; response view only), dialogue_id, turn.
``squad``  (SQuAD v1.1 JSON, e.g. XQuAD-en)
    context, question, answer (the first answer), answers (all answer texts), id, title.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.errors import TaskError

Row = dict[str, Any]


@dataclass(frozen=True)
class Reader:
    """A file format: the function that reads it and the options it takes (name -> default)."""

    read: Callable[[Path, dict[str, Any]], list[Row]]
    options: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- linearisations

def _clean(text: str) -> str:
    return " ".join(str(text).split())


def slot_string(pairs: Iterable[tuple[str, str]]) -> str:
    """[(slot, value), ...] -> "slot: value; slot: value" in the given order ("none" when empty).

    A ';' inside a value (two SNIPS tokens) becomes ',' so the string parses back unambiguously.
    """
    items = [f"{s}: {_clean(v).replace(';', ',')}" for s, v in pairs]
    return "; ".join(items) or "none"


def state_string(pairs: Iterable[tuple[str, str]]) -> str:
    """{slot: value} pairs -> "slot=value; slot=value" sorted by slot then value ("none" when empty)."""
    items = sorted({(_clean(s).lower(), _clean(v).lower().replace(";", ",")) for s, v in pairs})
    return "; ".join(f"{s}={v}" for s, v in items) or "none"


def bio_slots(tokens: list[str], tags: list[str]) -> list[tuple[str, str]]:
    """IOB2 tags -> [(slot, value)] in utterance order; an I- tag that does not continue a span opens one."""
    spans: list[tuple[str, list[str]]] = []
    current = None
    for tok, tag in zip(tokens, tags):
        if tag == "O" or "-" not in tag:
            current = None
            continue
        kind, slot = tag.split("-", 1)
        if kind == "B" or current != slot:
            spans.append((slot, [tok]))
            current = slot
        else:
            spans[-1][1].append(tok)
    return [(slot, " ".join(words)) for slot, words in spans]


def history_string(exchanges: list[tuple[str, str]], window: int) -> str:
    """The last ``window`` (system, user) exchanges as "system: ...\\nuser: ..." lines (empty turns left out)."""
    lines = []
    for system, user in exchanges[-window:]:
        if system:
            lines.append(f"system: {system}")
        lines.append(f"user: {user}")
    return "\n".join(lines)


def select_part(units: list[Any], ids: list[str], options: dict[str, Any]) -> list[Any]:
    """The units (dialogues, articles) in ``options["part"]`` = [lo, hi) of a seeded order, in file order."""
    part = options.get("part")
    if part is None:
        return units
    lo, hi = part
    seed = options.get("part_seed", 0)
    order = sorted(range(len(ids)), key=lambda i: hashlib.md5(f"{seed}:{ids[i]}".encode()).hexdigest())
    n = len(ids)
    keep = set(order[round(lo * n):round(hi * n)])
    return [u for i, u in enumerate(units) if i in keep]


# ----------------------------------------------------------------------------- archives and JSON

def _one_line(e: BaseException) -> str:
    # tarfile joins the reasons of each compression it tried with newlines
    return " ".join(str(e).split())


def _load_json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"bad JSON in {where} ({e}); re-copy the file") from None


def _tar_members(path: Path, names: list[str]) -> list[str]:
    """The text of ``names`` inside a tar archive, read in place."""
    try:
        with tarfile.open(path) as tar:
            have = tar.getnames()
            missing = [n for n in names if n not in have]
            if missing:
                raise TaskError(f"archive {path} has no member {missing[0]!r} (it has {', '.join(have[:8])}); "
                                "fix options.member")
            return [tar.extractfile(n).read().decode("utf-8") for n in names]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise TaskError(f"archive {path} cannot be read ({type(e).__name__}: {_one_line(e)}); "
                        "it is corrupted or not a tar file: re-copy it") from None


def _zip_json(path: Path, member: str | None) -> Any:
    """The JSON member of a zip archive, read in place (``member`` None: its only .json)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".json")]
            if member is None and len(names) != 1:
                raise TaskError(f"archive {path} holds {len(names)} JSON members ({', '.join(names[:5])}); "
                                "name one with options.member")
            name = member or names[0]
            if name not in z.namelist():
                raise TaskError(f"archive {path} has no member {name!r}; fix options.member")
            raw = z.read(name)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise TaskError(f"archive {path} cannot be read ({type(e).__name__}: {_one_line(e)}); "
                        "it is corrupted or not a zip file: re-copy it") from None
    return _load_json(raw, f"{path}:{name}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path} is not UTF-8 ({e}); check the file") from None


# ----------------------------------------------------------------------------- ATIS / SNIPS

def read_slu(path: Path, options: dict[str, Any]) -> list[Row]:
    rows = []
    for i, line in enumerate(_read_text(path).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if " <=> " not in line:
            raise TaskError(f"line {i} of {path} has no ' <=> INTENT' part; expected 'word:TAG ... <=> INTENT'")
        tagged, intents = line.rsplit(" <=> ", 1)
        tokens, tags = [], []
        for item in tagged.split():
            word, sep, tag = item.rpartition(":")  # SNIPS words hold colons: 04:45:B-timeRange
            if not sep:
                raise TaskError(f"line {i} of {path}: token {item!r} has no ':TAG'; expected 'word:TAG'")
            if not word:
                continue  # 11 SNIPS tokens are a bare ':O' (an empty word): nothing to keep
            tokens.append(word)
            tags.append(tag)
        rows.append({"utterance": " ".join(tokens), "intent": intents.split(";")[0], "intents": intents,
                     "slots": slot_string(bio_slots(tokens, tags))})
    return rows


# ----------------------------------------------------------------------------- E2E NLG

_E2E_ATTR = {"customerrating": "customer rating"}
_E2E_SRC = re.compile(r"__start_(\w+)__ (.*?) __end_\1__")


def _detok(text: str) -> str:
    """Undo the tarball's tokenisation: 'Prices start at £ 30 . <eos>' -> 'Prices start at £30.'"""
    text = text.replace("<eos>", " ")
    text = re.sub(r" ([.,!?;:%)])", r"\1", text)
    text = re.sub(r"([£$(]) ", r"\1", text)
    text = re.sub(r" (n't|'t|'s|'re|'ve|'m|'ll|'d)\b", r"\1", text)  # aren 't, it 's
    text = re.sub(r"(\w) - (\w)", r"\1-\2", text)  # family - friendly, 20 - 25, 3 - star
    return _clean(text)


def _mr_from_source(src: str) -> str:
    pairs = _E2E_SRC.findall(src)
    return ", ".join(f"{_E2E_ATTR.get(k, k)}[{_detok(v)}]" for k, v in pairs)


def read_e2e(path: Path, options: dict[str, Any]) -> list[Row]:
    pairs: list[tuple[str, str]] = []
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        m = options["member"]
        src, tgt = _tar_members(path, [f"e2e_aligned/src_{m}.txt", f"e2e_aligned/{m}.txt"])
        src_lines, tgt_lines = src.rstrip("\n").split("\n"), tgt.rstrip("\n").split("\n")
        if len(src_lines) != len(tgt_lines):
            raise TaskError(f"archive {path}: src_{m}.txt has {len(src_lines)} lines but {m}.txt "
                            f"{len(tgt_lines)}; they must be line-aligned (re-copy the archive)")
        pairs = [(_mr_from_source(s), _detok(t.split("|||")[0])) for s, t in zip(src_lines, tgt_lines)]
    else:
        import csv

        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
                raise TaskError(f"{path} has columns {reader.fieldnames}; an E2E csv needs 'mr' and 'ref'")
            pairs = [(_clean(r["mr"]), _clean(r["ref"])) for r in reader]
    refs: dict[str, list[str]] = defaultdict(list)
    for mr, ref in pairs:
        refs[mr].append(ref)
    if options["group"]:
        return [{"mr": mr, "ref": rs[0], "references": rs} for mr, rs in refs.items()]
    return [{"mr": mr, "ref": ref, "references": refs[mr]} for mr, ref in pairs]


# ----------------------------------------------------------------------------- WOZ 2.0

def read_woz(path: Path, options: dict[str, Any]) -> list[Row]:
    data = _load_json(_read_text(path), str(path))
    if not isinstance(data, list) or not all(isinstance(d, dict) and "dialogue" in d for d in data):
        raise TaskError(f"{path} is not WOZ 2.0 JSON; expected a list of {{dialogue_idx, dialogue: [turn, ...]}}")
    H, response = options["history"], options["view"] == "response"
    rows = []
    data = select_part(data, [str(d.get("dialogue_idx", i)) for i, d in enumerate(data)], options)
    for d in data:
        turns = d["dialogue"]
        exchanges: list[tuple[str, str]] = []
        for t, turn in enumerate(turns):
            exchanges.append((_clean(turn.get("system_transcript", "")), _clean(turn["transcript"])))
            inform = [tuple(s) for b in turn.get("belief_state", []) if b.get("act") == "inform" for s in b["slots"]]
            requests = [v for s, v in turn.get("turn_label", []) if s == "request"]
            row = {"history": history_string(exchanges, H), "user": exchanges[-1][1],
                   "state": state_string(inform), "requests": ", ".join(requests) or "none",
                   "dialogue_id": str(d.get("dialogue_idx", "")), "turn": str(t)}
            if response:
                if t + 1 >= len(turns):
                    continue  # the data lacks every dialogue's closing system turn
                row["reply"] = _clean(turns[t + 1].get("system_transcript", ""))
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- MultiWOZ 2.1

_DONTCARE = {"dontcare", "don't care", "dont care", "do n't care", "do nt care"}


def _multiwoz_state(metadata: dict[str, Any]) -> str:
    pairs = []
    for domain, parts in metadata.items():
        for kind in ("semi", "book"):
            for slot, value in (parts.get(kind) or {}).items():
                if slot == "booked" or not isinstance(value, str):
                    continue
                value = _clean(value).lower()
                if value in ("", "not mentioned", "none"):
                    continue
                value = "dontcare" if value in _DONTCARE else value
                name = f"{domain}-book {slot}" if kind == "book" else f"{domain}-{slot}"
                pairs.append((name.lower(), value))
    return state_string(pairs)


def read_multiwoz(path: Path, options: dict[str, Any]) -> list[Row]:
    data = _zip_json(path, options["member"]) if path.suffix == ".zip" else _load_json(_read_text(path), str(path))
    if not isinstance(data, dict) or not all(isinstance(d, dict) and "log" in d for d in data.values()):
        raise TaskError(f"{path} is not MultiWOZ JSON; expected {{dialogue_id: {{goal, log: [turn, ...]}}}}")
    H = options["history"]
    rows = []
    for did in select_part(list(data), list(data), options):
        d = data[did]
        log = d["log"]
        exchanges: list[tuple[str, str]] = []
        previous = "none"
        for t in range(0, len(log) - 1, 2):  # user turns at even index, the system turn after each
            system_before = _clean(log[t - 1]["text"]) if t else ""
            exchanges.append((system_before, _clean(log[t]["text"])))
            state = _multiwoz_state(log[t + 1].get("metadata") or {})
            rows.append({"history": history_string(exchanges, H), "user": exchanges[-1][1], "state": state,
                         "previous_state": previous, "reply": _clean(log[t + 1]["text"]),
                         "dialogue_id": did, "turn": str(t // 2)})
            previous = state
    return rows


# ----------------------------------------------------------------------------- SGD

def read_sgd(path: Path, options: dict[str, Any]) -> list[Row]:
    files = sorted(path.glob("dialogues_*.json")) if path.is_dir() else [path]
    if not files:
        raise TaskError(f"folder {path} holds no dialogues_*.json files; point the split at an SGD folder or file")
    H, response = options["history"], options["view"] == "response"
    dialogues = []
    for fp in files:
        data = _load_json(_read_text(fp), str(fp))
        if not isinstance(data, list) or not all(isinstance(d, dict) and "turns" in d for d in data):
            raise TaskError(f"{fp} is not SGD JSON; expected a list of {{dialogue_id, services, turns}}")
        dialogues.extend(data)
    rows = []
    for d in select_part(dialogues, [str(d["dialogue_id"]) for d in dialogues], options):
        turns = d["turns"]
        exchanges: list[tuple[str, str]] = []
        system_before = ""
        for i, turn in enumerate(turns):
            if turn["speaker"] != "USER":
                system_before = _clean(turn["utterance"])
                continue
            exchanges.append((system_before, _clean(turn["utterance"])))
            frames = [f for f in turn.get("frames", []) if "state" in f]
            pairs = [(s, vs[0]) for f in frames for s, vs in f["state"]["slot_values"].items() if vs]
            active = [f for f in frames if f["state"].get("active_intent", "NONE") != "NONE"]
            row = {"history": history_string(exchanges, H), "user": exchanges[-1][1],
                   "state": state_string(pairs),
                   "intent": active[0]["state"]["active_intent"] if active else "NONE",
                   "service": (active or frames or [{"service": ""}])[0]["service"],
                   "dialogue_id": str(d["dialogue_id"]), "turn": str(len(exchanges) - 1)}
            if response:
                nxt = turns[i + 1] if i + 1 < len(turns) else None
                if nxt is None or nxt["speaker"] != "SYSTEM":
                    continue
                row["reply"] = _clean(nxt["utterance"])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- SQuAD / XQuAD

def read_squad(path: Path, options: dict[str, Any]) -> list[Row]:
    data = _load_json(_read_text(path), str(path))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskError(f"{path} is not SQuAD JSON; expected {{version, data: [{{title, paragraphs}}]}}")
    rows = []
    articles = data["data"]
    for article in select_part(articles, [str(a.get("title", i)) for i, a in enumerate(articles)], options):
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [_clean(a["text"]) for a in qa.get("answers", [])]
                if not answers:
                    continue  # SQuAD v2 unanswerable questions: not an extractive target
                rows.append({"context": _clean(para["context"]), "question": _clean(qa["question"]),
                             "answer": answers[0], "answers": answers, "id": str(qa.get("id", "")),
                             "title": str(article.get("title", ""))})
    return rows


# ----------------------------------------------------------------------------- the registry

_VIEW = ("state", "response")
_PART = {"part": None, "part_seed": 0}
READERS: dict[str, Reader] = {
    "slu": Reader(read_slu),
    "e2e": Reader(read_e2e, {"group": False, "member": "train"}),
    "woz": Reader(read_woz, {"view": "state", "history": 4, **_PART}, {"view": _VIEW}),
    "multiwoz": Reader(read_multiwoz, {"view": "state", "history": 2, "member": None, **_PART}, {"view": _VIEW}),
    "sgd": Reader(read_sgd, {"view": "state", "history": 2, **_PART}, {"view": _VIEW}),
    "squad": Reader(read_squad, dict(_PART)),
}
FORMATS: tuple[str, ...] = tuple(READERS)
"""The dialogue / text-to-text file formats (``data.format``)."""

LIST_COLUMNS = ("references", "answers")
"""Columns whose value is a list of strings (multi-reference targets)."""


def option_problem(fmt: str, options: Any) -> str | None:
    """What is wrong with ``options`` for format ``fmt`` (a phrase naming the option and the fix), or None."""
    reader = READERS[fmt]
    if options in (None, {}):
        return None
    if not isinstance(options, dict):
        return f"is {options!r}; give a mapping such as {{view: state, history: 4}}"
    unknown = sorted(set(options) - set(reader.options))
    if unknown:
        allowed = ", ".join(reader.options) or "none"
        return f"has {unknown[0]!r}, which format {fmt} does not take; its options are: {allowed}"
    for key, value in options.items():
        if key in reader.choices and value not in reader.choices[key]:
            return f"{key} is {value!r}; choose one of {', '.join(reader.choices[key])}"
        if key == "history" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"history is {value!r}; give the number of exchanges to keep (1 or more)"
        if key == "group" and not isinstance(value, bool):
            return f"group is {value!r}; give true or false"
        if key == "member" and value is not None and not isinstance(value, str):
            return f"member is {value!r}; name the archive member"
        if key == "part" and value is not None and not (
                isinstance(value, list) and len(value) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
                and 0 <= value[0] < value[1] <= 1):
            return f"part is {value!r}; give [lo, hi] with 0 <= lo < hi <= 1, e.g. [0, 0.5]"
        if key == "part_seed" and (not isinstance(value, int) or isinstance(value, bool)):
            return f"part_seed is {value!r}; give an integer"
    return None


def read(fmt: str, path: Path, options: dict[str, Any] | None = None) -> list[Row]:
    """Rows of one file (or archive, or SGD folder) in format ``fmt``; ``options`` over the reader's defaults."""
    reader = READERS[fmt]
    problem = option_problem(fmt, options)
    if problem:
        raise TaskError(f"data.options {problem}")
    return reader.read(path, {**reader.options, **(options or {})})


__all__ = ["FORMATS", "LIST_COLUMNS", "READERS", "Reader", "bio_slots", "history_string", "option_problem",
           "read", "slot_string", "state_string"]
