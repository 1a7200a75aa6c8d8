"""A task's data: the readers, rows -> checked columns, carved splits, k-shot sampling.

``load_splits(spec)`` turns a task spec (composer.tasks) into datasets. Optional data fields
read here:

``data.splits.<split>`` may be a path or a mapping ``{path: ..., <any reader key>}``
    whose keys override the data-level reader keys for that split only (e.g. a test
    file in another format, with other column names or other label values).
``data.delimiter``
    field separator: tsv ``"\\t"``, csv ``","``, lines ``" "`` by default. For
    ``lines`` the line is split at most ``len(columns) - 1`` times, so the last column
    keeps its spaces (``label<space>text`` or ``label<TAB>premise<TAB>hypothesis``).
``data.quoting``
    ``none`` (tsv default: GLUE files must be read without quote handling) or
    ``minimal`` (csv default).
``data.label_map``
    ``{raw: label}`` applied to the normalised raw label before it is checked against
    ``labels`` (e.g. ``{neg: "0", pos: "1"}``).
``data.format: folders``
    the split path is a directory with one sub-directory per raw label, one text file
    per example; the text goes into ``columns[0]`` (default ``text``).
``data.split: {from: train, dev: 0.1, test: 0.1, seed: 0}``
    carves deterministic held-out splits out of split ``from`` (default ``train``) for
    data with no official split (MR, CR, SUBJ, MPQA): a seeded permutation gives the
    first ``round(n * train)`` rows to train (when ``from`` is another split: a train
    carved from a dev- or test-only set), the next ``round(n * dev)`` to dev, the next
    ``round(n * test)`` to test, and the rest (in file order) stays in ``from``.
``data.format: slu | e2e | woz | multiwoz | sgd | squad`` with ``data.options``
    the dialogue / text-to-text readers of composer.dialogue (archives read in place).
``data.seed`` (builtin)
    the seed passed to ``composer.suite.generate`` (default 0).

Conventions:

- Input fields are read as strings with surrounding whitespace stripped.
- Relative paths resolve against the data directory (``--data-dir``, else
  ``PROMPT_COMPOSER_DATA``, else the current directory).
- ``field_map: {old: new}`` renames columns after reading; names absent from a file
  are ignored, so one map can serve files that differ.
- k-shot sampling applies to the train split only: ``k`` rows per class (generation
  tasks: ``k`` rows), drawn with ``numpy.random.default_rng(seed)``, kept in file order.
- Generation tasks get columns ``spec.inputs``, the target template's fields (str) and
  the ``references`` column (list of str) if the task names one; no ``label``. A row whose
  rendered target is empty is an error.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from composer import dialogue, suite
from composer.errors import TaskError
from composer.tasks import (
    CARVED,
    DATA_HINT,
    QUOTING,
    TaskSpec,
    normalize_label,
    resolve_data_dir,
    split_config,
    split_entry,
)
from composer.templates import render

if TYPE_CHECKING:  # datasets is imported where data is loaded, not at import time
    import datasets

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- readers
# Each reader returns raw rows: a list of dicts keyed by column name.

def _encoding(enc: str) -> str:
    # utf-8-sig strips the BOM that MRPC's header starts with, and reads plain utf-8 alike
    return "utf-8-sig" if enc.lower().replace("_", "-") in ("utf-8", "utf8") else enc


def _read_delimited(path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    fmt = cfg["format"]
    delim = cfg.get("delimiter") or ("\t" if fmt == "tsv" else ",")
    quoting = QUOTING[cfg.get("quoting") or ("none" if fmt == "tsv" else "minimal")]
    csv.field_size_limit(2**31 - 1)  # IMDB-length reviews exceed the 128 KiB default
    with open(path, encoding=_encoding(cfg["encoding"]), newline="") as f:
        reader = csv.reader(f, delimiter=delim, quoting=quoting)
        rows = [r for r in reader if r and any(x.strip() for x in r)]
    if cfg["header"]:
        names = [c.strip().lstrip("\ufeff") for c in rows[0]] if rows else []
        rows = rows[1:]
        if cfg.get("columns"):
            names = list(cfg["columns"])
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:  # dict(zip(...)) would keep the last silently
            at = [i + 1 for i, n in enumerate(names) if n == dup]
            raise TaskError(f"{path}: the header names column {dup!r} twice (columns {at[0]} and {at[1]}); "
                            "rename one in the file, or name every column with `columns:` in the task's data")
    else:
        names = list(cfg["columns"])
    long = sum(len(r) > len(names) for r in rows)
    if long:
        log.debug("%s: %d rows have more than %d fields; extra fields dropped", path, long, len(names))
    # a short (ragged) row simply lacks its last columns; missing needed fields are reported later
    return [dict(zip(names, r)) for r in rows]


def _read_lines(path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(cfg.get("columns") or ["label", "text"])
    delim = cfg.get("delimiter") or " "
    text = path.read_text(encoding=_encoding(cfg["encoding"]))
    rows = []
    # split on "\n" only: latin-1 MR/SUBJ hold \x85 (NEL), which str.splitlines would treat as a newline
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        rows.append(dict(zip(names, line.split(delim, len(names) - 1))))
    return rows


def _read_json(path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_text(encoding=_encoding(cfg["encoding"])))
    except json.JSONDecodeError as e:
        raise TaskError(f"bad JSON in {path} at line {e.lineno}: {e.msg}; fix the file") from None
    rec = cfg.get("records")
    if isinstance(obj, dict):
        if rec == "values":
            obj = list(obj.values())
        elif isinstance(rec, str) and isinstance(obj.get(rec), list):
            obj = obj[rec]
        else:
            raise TaskError(f"{path} holds a JSON object, not a list of records; set `records: values` "
                            "(for {\"0\": {...}, ...}) or `records: KEY` (for {KEY: [...]})")
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise TaskError(f"{path} does not hold a list of JSON records; give [{{...}}, ...]")
    return obj


def _read_jsonl(path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding=_encoding(cfg["encoding"])) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"bad JSON on line {i} of {path}: {e.msg}; fix the line") from None
            if not isinstance(row, dict):
                raise TaskError(f"line {i} of {path} holds a JSON {type(row).__name__}, not an object; each line "
                                "of a jsonl file is one record: {\"field\": value, ...}")
            rows.append(row)
    return rows


def _read_folders(path: Path, cfg: dict[str, Any], label_field: str) -> list[dict[str, Any]]:
    if not path.is_dir():
        raise TaskError(f"{path} is not a directory; format: folders wants one sub-folder per label")
    text_col = (cfg.get("columns") or ["text"])[0]
    rows = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        for fp in sorted(sub.iterdir()):
            if fp.is_file():
                text = fp.read_text(encoding=_encoding(cfg["encoding"]))
                rows.append({text_col: text, label_field: sub.name})
    return rows


def _decode_error(path: Path, encoding: str, e: UnicodeDecodeError, split: str) -> str:
    """Which byte of which file the declared encoding cannot read, and the field that fixes it."""
    offset = e.start  # within the chunk a stream decoded: find the file's own offset when it is one file
    if path.is_file():
        try:
            path.read_bytes().decode(_encoding(encoding))
        except UnicodeDecodeError as whole:
            offset, e = whole.start, whole
    byte = e.object[e.start] if e.start < len(e.object) else None
    shown = f"byte 0x{byte:02x}" if byte is not None else "a byte"
    return (f"{path} (split '{split}') is not {encoding} text: {shown} at offset {offset} cannot be decoded; "
            "set `encoding:` in the task's data (e.g. latin-1 or cp1252) to the file's encoding")


def _data_path(rel: str, data_dir: Path | None) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else (data_dir or Path.cwd()) / p


def read_rows(spec: TaskSpec, split: str, data_dir: Path | None) -> tuple[list[dict[str, Any]], str]:
    """Raw rows of one file split (after field_map) and the file they came from."""
    cfg = split_config(spec, split)
    path = _data_path(cfg["path"], data_dir).resolve()
    if not path.exists():
        where = f"data directory {data_dir}" if data_dir else f"no data directory given, so {Path.cwd()}"
        raise TaskError(f"data file {path} for split '{split}' of task {spec.name} not found ({where}); "
                        f"{DATA_HINT} to the folder that holds {cfg['path']}")
    fmt = cfg["format"]
    try:
        if fmt in dialogue.READERS:
            rows = dialogue.read(fmt, path, cfg.get("options"))
        elif fmt in ("csv", "tsv"):
            rows = _read_delimited(path, cfg)
        elif fmt == "lines":
            rows = _read_lines(path, cfg)
        elif fmt == "json":
            rows = _read_json(path, cfg)
        elif fmt == "jsonl":
            rows = _read_jsonl(path, cfg)
        else:
            rows = _read_folders(path, cfg, spec.label_field)
    except UnicodeDecodeError as e:
        raise TaskError(_decode_error(path, cfg.get("encoding") or "utf-8", e, split)) from None
    except IsADirectoryError:
        raise TaskError(f"data file {path} for split '{split}' of task {spec.name} is a folder; give a file "
                        "(or `format: folders`)") from None
    fmap = cfg.get("field_map") or {}
    if fmap:
        rows = [{fmap.get(k, k): v for k, v in r.items()} for r in rows]
    return rows, str(path)


def _hub_rows(spec: TaskSpec, split: str) -> tuple[list[dict[str, Any]], str]:
    import datasets

    d = spec.data
    hub_split = split_entry(d["splits"][split])["path"]
    try:
        ds = datasets.load_dataset(d["path"], d.get("name"), split=hub_split)
    except ConnectionError as e:  # datasets' offline answer (HF_HUB_OFFLINE=1 is prompt-composer's default)
        raise TaskError(f"task {spec.name}: hub dataset {d['path']!r} is not in the local datasets cache and the hub "
                        "is off (prompt-composer runs offline); fetch it once with HF_HUB_OFFLINE=0 "
                        "prompt-composer task check ..., or point data.source at local files") from e
    rows = [dict(r) for r in ds]
    fmap = d.get("field_map") or {}
    if fmap:
        rows = [{fmap.get(k, k): v for k, v in r.items()} for r in rows]
    return rows, f"hub {d['path']}/{d.get('name') or ''}:{hub_split}"


def _builtin_rows(spec: TaskSpec, split: str, seed: int) -> tuple[list[dict[str, Any]], str]:
    splits = spec.data.get("splits")
    gen_split = split_entry(splits[split])["path"] if isinstance(splits, dict) and split in splits else split
    gen = spec.data["generator"]
    return suite.generate(gen, gen_split, seed), f"builtin generator {gen}:{gen_split}"


# ----------------------------------------------------------------------------- rows -> columns

def _to_columns(spec: TaskSpec, split: str, rows: list[dict[str, Any]], origin: str,
                label_map: Mapping[str, str] | None) -> dict[str, list]:
    """Check and convert raw rows into columns: inputs (str), label (int), score (float, regression)."""
    if not rows:
        raise TaskError(f"split '{split}' of task {spec.name} is empty ({origin}); "
                        "check the file, or drop the split from data.splits")
    if spec.is_generation:
        return _generation_columns(spec, split, rows, origin)
    index = {lab: i for i, lab in enumerate(spec.labels)}
    lmap = {normalize_label(k): normalize_label(v) for k, v in (label_map or {}).items()}
    reg = spec.regression
    need = [*spec.inputs, reg["field"] if reg else spec.label_field]
    cols: dict[str, list] = {k: [] for k in spec.inputs}
    cols["label"] = []
    if reg:
        cols["score"] = []
        bins = np.asarray(reg["bins"], dtype=np.float64)
    for i, row in enumerate(rows, 1):
        missing = [k for k in need if k not in row or row[k] is None]
        if missing:
            what = "regression field" if reg and missing[0] == reg["field"] else (
                "label field" if missing[0] == spec.label_field else "input field")
            raise TaskError(
                f"row {i} of {origin} (split '{split}') has no {what} {missing[0]!r} "
                f"(fields: {', '.join(map(str, row))}); "
                "fix `inputs`/`label_field` or map it with data.field_map"
            )
        for k in spec.inputs:
            cols[k].append(str(row[k]).strip())
        if reg:
            try:
                score = float(row[reg["field"]])
            except (TypeError, ValueError):
                raise TaskError(f"row {i} of {origin} (split '{split}') has score {row[reg['field']]!r}, "
                                "not a number; fix the row or regression.field") from None
            cols["score"].append(score)
            cols["label"].append(int(np.digitize(score, bins)))
            continue
        raw = normalize_label(row[spec.label_field])
        lab = lmap.get(raw, raw)
        if lab not in index:
            raise TaskError(f"label {lab!r} in row {i} of {origin} (split '{split}') is not one of "
                            f"the labels {spec.labels} of task {spec.name}; add it to `labels`, "
                            "map it with data.label_map, or fix the row")
        cols["label"].append(index[lab])
    return cols


def _generation_columns(spec: TaskSpec, split: str, rows: list[dict[str, Any]], origin: str) -> dict[str, list]:
    """Columns of a generation task: inputs and target fields (str), references (list of str)."""
    text_cols = list(dict.fromkeys([*spec.inputs, *spec.target_fields]))
    cols: dict[str, list] = {k: [] for k in text_cols}
    if spec.references:
        cols[spec.references] = []
    for i, row in enumerate(rows, 1):
        missing = [k for k in (*text_cols, *([spec.references] if spec.references else []))
                   if k not in row or row[k] is None]
        if missing:
            what = "input field" if missing[0] in spec.inputs else (
                "target field" if missing[0] in spec.target_fields else "references column")
            raise TaskError(
                f"row {i} of {origin} (split '{split}') has no {what} {missing[0]!r} "
                f"(fields: {', '.join(map(str, row))}); "
                "fix `inputs`/`target`/`references` or map it with data.field_map"
            )
        values = {k: str(row[k]).strip() for k in text_cols}
        if not render(spec.target, values).strip():
            raise TaskError(f"row {i} of {origin} (split '{split}') has an empty target "
                            f"({spec.target!r} renders to nothing); fix or drop the row in the data")
        for k in text_cols:
            cols[k].append(values[k])
        if spec.references:
            refs = row[spec.references]
            refs = [refs] if isinstance(refs, str) else [str(r).strip() for r in refs]
            if not refs or not all(refs):
                raise TaskError(f"row {i} of {origin} (split '{split}') has an empty reference in "
                                f"{spec.references!r} ({row[spec.references]!r}); fix or drop the row")
            cols[spec.references].append(refs)
    return cols


def _n_rows(cols: dict[str, list]) -> int:
    return len(next(iter(cols.values())))


def _take(cols: dict[str, list], idx: Iterable[int]) -> dict[str, list]:
    idx = list(idx)
    return {k: [v[i] for i in idx] for k, v in cols.items()}


def _carve(spec: TaskSpec, cols: dict[str, list]) -> dict[str, dict[str, list]]:
    """Split ``cols`` of data.split.from into {from, and the carved train/dev/test} deterministically."""
    carve = spec.data["split"]
    src = carve.get("from", "train")
    n = _n_rows(cols)
    carved = [s for s in CARVED if s in carve and s != src]
    sizes = {s: round(n * float(carve[s])) for s in carved}
    perm = np.random.default_rng(int(carve.get("seed", 0))).permutation(n)
    out, start = {}, 0
    for s in carved:
        out[s] = _take(cols, sorted(perm[start:start + sizes[s]]))
        start += sizes[s]
    out[src] = _take(cols, sorted(perm[start:]))
    return out


def sample_k_shot(labels: np.ndarray | list[int], k: int, seed: int, label_names: list[str] | None = None,
                  where: str = "train") -> list[int]:
    """Row indices with ``k`` rows per class (classes 0..C-1 of ``label_names``), in file order.

    labels: [N] int class ids. Raises TaskError when a class has fewer than k rows.
    """
    labels = np.asarray(labels)
    C = len(label_names) if label_names is not None else int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(C):
        members = np.flatnonzero(labels == c)
        name = label_names[c] if label_names is not None else str(c)
        if len(members) < k:
            raise TaskError(f"k-shot k={k} exceeds class {name!r} which has {len(members)} rows in {where}; "
                            f"lower k to at most {len(members)}")
        chosen.extend(int(i) for i in rng.permutation(members)[:k])
    return sorted(chosen)


def sample_k_rows(n: int, k: int, seed: int, where: str = "train") -> list[int]:
    """``k`` row indices out of ``n`` (generation tasks: k examples, not k per class), in file order."""
    if k > n:
        raise TaskError(f"k-shot k={k} exceeds the {n} rows of {where}; lower k to at most {n}")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])


def load_splits(
    spec: TaskSpec,
    data_dir: str | Path | None = None,
    splits: Iterable[str] | None = None,
    k_shot: int | None = None,
    seed: int | None = None,
) -> dict[str, datasets.Dataset]:
    """Load a task's splits as datasets.

    Args:
        spec: the task.
        data_dir: folder that relative data paths resolve against (default: resolve_data_dir(None)).
        splits: names to load (default: all of ``spec.split_names()``).
        k_shot: rows per class sampled from train (generation: rows); None = ``spec.few_shot["k"]``
            if set, 0 = all rows.
        seed: k-shot seed; None = ``spec.few_shot["seed"]`` or 0. (Builtin generators use
            ``data.seed``, default 0, so the rows do not change with the run's seed.)

    Returns:
        {split: Dataset} with columns ``spec.inputs`` (str), ``label`` (int64 index into
        ``spec.labels``) and, for regression, ``score`` (float64). Generation tasks: ``spec.inputs``
        and ``spec.target_fields`` (str), and ``spec.references`` (list of str) if set.
    """
    import datasets

    data_dir = resolve_data_dir(data_dir)
    available = spec.split_names()
    wanted = list(splits) if splits is not None else available
    for s in wanted:
        if s not in available:
            raise TaskError(f"task {spec.name} has no split {s!r}; choose from {', '.join(available)}")
    fs = spec.few_shot or {}
    k = fs.get("k", 0) if k_shot is None else k_shot
    seed = fs.get("seed", 0) if seed is None else seed
    src = spec.data["source"]
    carve = spec.data.get("split") or {}
    carve_from = carve.get("from", "train") if carve else None
    carved = [s for s in CARVED if s in carve and s != carve_from]

    cols: dict[str, dict[str, list]] = {}
    to_read = [s for s in wanted if s not in carved]
    if carve_from and any(s in carved or s == carve_from for s in wanted) and carve_from not in to_read:
        to_read.append(carve_from)
    for s in to_read:
        if src == "files":
            rows, origin = read_rows(spec, s, data_dir)
            lmap = split_config(spec, s).get("label_map")
        elif src == "hub":
            rows, origin = _hub_rows(spec, s)
            lmap = spec.data.get("label_map")
        else:
            # the generator's seed is part of the task (data.seed), not of the run, so every
            # training seed sees the same dev/test rows
            rows, origin = _builtin_rows(spec, s, int(spec.data.get("seed", 0)))
            lmap = spec.data.get("label_map")
        cols[s] = _to_columns(spec, s, rows, origin, lmap)
        log.info("task %s split %s: %d rows from %s", spec.name, s, len(rows), origin)
    if carve_from in cols:
        cols.update(_carve(spec, cols[carve_from]))

    if spec.is_generation:
        features = {f: datasets.Value("string") for f in dict.fromkeys([*spec.inputs, *spec.target_fields])}
        if spec.references:
            features[spec.references] = datasets.Sequence(datasets.Value("string"))
    else:
        features = {f: datasets.Value("string") for f in spec.inputs}
        features["label"] = datasets.Value("int64")
        if spec.is_regression:
            features["score"] = datasets.Value("float64")
    out = {}
    for s in wanted:
        c = cols[s]
        if not _n_rows(c):
            raise TaskError(f"split '{s}' of task {spec.name} is empty after carving; "
                            "raise the data.split fractions")
        if s == "train" and k:
            where = f"split 'train' of task {spec.name}"
            idx = (sample_k_rows(_n_rows(c), k, seed, where) if spec.is_generation
                   else sample_k_shot(c["label"], k, seed, spec.labels, where))
            c = _take(c, idx)
        out[s] = datasets.Dataset.from_dict(c, features=datasets.Features(features))
    return out


def check_task(spec: TaskSpec, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Load every split and summarise it (for `prompt-composer task check`).

    Returns {"task", "type", "source", "num_labels", "metric", "splits": {split: {"rows", "labels": {label:
    count}}}} (plus "score": {min, max, mean} per split for regression tasks). Generation tasks:
    {"task", "type", "source", "metric", "metrics", "splits": {split: {"rows", "target_words": {min, mean,
    max}, "references": mean references per row (when the task names a references column)}}}.
    Raises TaskError on the first fault.
    """
    ds = load_splits(spec, data_dir, k_shot=0)
    if spec.is_generation:
        return _check_generation(spec, ds)
    summary: dict[str, Any] = {"task": spec.name, "type": spec.type, "source": spec.data["source"],
                               "num_labels": spec.num_labels, "metric": spec.metric, "splits": {}}
    for s, d in ds.items():
        counts = Counter(d["label"])
        entry: dict[str, Any] = {"rows": len(d),
                                 "labels": {lab: counts.get(i, 0) for i, lab in enumerate(spec.labels)}}
        if spec.is_regression:
            sc = np.asarray(d["score"], dtype=np.float64)
            entry["score"] = {"min": float(sc.min()), "max": float(sc.max()), "mean": float(sc.mean())}
        summary["splits"][s] = entry
    return summary


def _check_generation(spec: TaskSpec, ds: Mapping[str, datasets.Dataset]) -> dict[str, Any]:
    summary: dict[str, Any] = {"task": spec.name, "type": spec.type, "source": spec.data["source"],
                               "metric": spec.metric, "metrics": spec.metric_names, "splits": {}}
    for s, d in ds.items():
        words = np.asarray([len(spec.render_target(r).split()) for r in d], dtype=np.float64)
        entry: dict[str, Any] = {"rows": len(d), "target_words": {
            "min": int(words.min()), "mean": round(float(words.mean()), 1), "max": int(words.max())}}
        if spec.references:
            entry["references"] = round(float(np.mean([len(r) for r in d[spec.references]])), 2)
        summary["splits"][s] = entry
    return summary
