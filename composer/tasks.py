"""Task specs (tasks/NAME.yaml): parsing, validation, and the catalogue they are found in.

A task says where its data comes from, which fields make the input, the template that
joins them, its labels with their verbalizer words / descriptions, and its metric.
The YAML schema is in docs/CONTRACTS.md; this module adds a few optional fields
(the data-reading ones are described in composer.taskdata):

``regression.range: [lo, hi]``
    the score range, used by ``TaskSpec.bin_centers()`` (midpoints of the bins).

Generation tasks (``type: generation``) replace the labels with a target template::

    type: generation
    inputs: [mr]
    template: "Data: {mr} Text:"
    target: " {ref}"              # same template syntax; its fields are columns of the data
    references: references        # optional: a list column scored against instead of the target
    max_target_length: 64         # target tokens
    stop: ["\n"]                  # optional stop strings for generation
    metric: rouge_l               # a generation metric (composer.metrics.GENERATION_METRICS)
    metrics: [rouge_l, bleu]      # optional: every metric to report, the main one first

``labels``, ``label_words``, ``label_descriptions``, ``label_field``, ``head`` and ``regression`` do
not apply to them; ``few_shot.k`` is k examples (not k per class).

Conventions:

- Label values are normalised to strings with one rule: Python bools become
  ``"true"``/``"false"``, integral numbers ``"3"`` (so ``1`` and ``1.0`` both give
  ``"1"``), anything else ``str(value).strip()``. ``labels`` in a YAML go through the
  same rule, so ``labels: [false, true]`` and ``labels: ["false", "true"]`` agree.
"""
from __future__ import annotations

import csv
import importlib.resources
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from composer.config import HEADS
from composer.dialogue import FORMATS as DIALOGUE_FORMATS
from composer.dialogue import option_problem
from composer.errors import TaskError
from composer.metrics import GENERATION_METRICS, METRICS
from composer.templates import TemplateError, render, template_fields

log = logging.getLogger(__name__)

DATA_ENV = "PROMPT_COMPOSER_DATA"
SOURCES = ("files", "hub", "builtin")
FORMATS = ("tsv", "csv", "json", "jsonl", "lines", "folders", *DIALOGUE_FORMATS)
TASK_TYPES = ("classification", "generation")
QUOTING = {"none": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL}
READER_KEYS = ("format", "header", "columns", "encoding", "records", "field_map", "delimiter", "quoting",
               "label_map", "options")
DATA_KEYS = ("source", "splits", "path", "name", "generator", "seed", "split", *READER_KEYS)
REQUIRED = ("data", "inputs", "labels")  # labels: classification tasks only
CARVED = ("train", "dev", "test")  # the splits data.split may carve
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_HINT = "pass --data-dir DIR or set PROMPT_COMPOSER_DATA"


def normalize_label(value: Any) -> str:
    """The one rule that turns a raw label value into the string stored in ``labels``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass
class TaskSpec:
    """One task: its data, input template, labels and metric (tasks/NAME.yaml)."""

    name: str
    """Task name; equals the YAML file stem."""
    data: dict[str, Any]
    """Where the rows come from: source files | hub | builtin, and how to read them."""
    inputs: list[str]
    """Fields that make the input, in template order."""
    labels: list[str] = field(default_factory=list)
    """Raw label values as strings (or bin names for regression); index = class id. Empty for generation."""
    description: str = ""
    """One line shown by `prompt-composer task list`."""
    template: str | None = None
    """Joins the input fields, e.g. "{premise} Question: {hypothesis}"; default: fields joined by a space."""
    label_field: str | None = None
    """Column holding the label (default "label"; ignored for regression, which reads regression.field)."""
    label_words: list[str] | None = None
    """Verbalizer words aligned with labels (leading space for decoders); default: " " + label."""
    label_descriptions: list[str] | None = None
    """Short phrases for the label-similarity head; default: label_words stripped."""
    metric: str | None = None
    """accuracy (default) | f1 | matthews | pearson | spearman; generation: one of GENERATION_METRICS."""
    max_length: int = 128
    """Input tokens; fields are truncated, the template's literal text is kept."""
    head: str | None = None
    """Scoring head; None = the backbone family's default."""
    few_shot: dict[str, int] | None = None
    """Default k-shot sampling of train: {k: 16, seed: 13} (k per class; generation: k rows); None = all."""
    regression: dict[str, Any] | None = None
    """{field: score, bins: [2.5], range: [0, 5]}: label i when bins[i-1] <= score < bins[i]."""
    type: str = "classification"
    """classification (labels scored by a head; regression is a binned classification) | generation."""
    target: str | None = None
    """Generation: the target template, e.g. " {answer}"; its fields are columns of the data."""
    references: str | None = None
    """Generation: a list-of-strings column scored against (multi-reference); default: the rendered target."""
    max_target_length: int = 64
    """Generation: target tokens (the target is truncated to this in training, and the generation limit)."""
    stop: list[str] | None = None
    """Generation: strings that end a generated text (besides EOS); None = EOS only."""
    metrics: list[str] | None = None
    """Generation: every metric to report, the main one (``metric``) first; default [metric]."""
    path: str | None = field(default=None, compare=False, repr=False)
    """The YAML file this spec was read from (not a YAML key)."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_labels(self) -> int:
        """C, the number of classes (bins for regression)."""
        return len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.regression is not None

    @property
    def is_generation(self) -> bool:
        return self.type == "generation"

    @property
    def target_fields(self) -> list[str]:
        """The data columns the target template uses (generation), else []."""
        return template_fields(self.target) if self.target else []

    @property
    def metric_names(self) -> list[str]:
        """Every metric to report, the main one first (``metrics`` for generation, else [metric])."""
        return list(self.metrics) if self.metrics else [self.metric]

    def split_names(self) -> list[str]:
        """The splits this task provides (declared plus carved), e.g. ["train", "dev", "test"]."""
        splits = self.data.get("splits")
        if self.data["source"] == "builtin" and not splits:
            names = ["train", "dev", "test"]
        else:
            names = list(splits)
        carve = self.data.get("split") or {}
        names += [s for s in CARVED if s in carve and s not in names]
        order = {s: i for i, s in enumerate(("train", "dev", "test"))}
        return sorted(names, key=lambda s: order.get(s, len(order)))  # stable: other names keep YAML order

    def bin_centers(self) -> np.ndarray | None:
        """[C] the value each bin stands for (regression with a range), else None."""
        if not self.regression or "range" not in self.regression:
            return None
        lo, hi = (float(x) for x in self.regression["range"])
        edges = [lo, *(float(b) for b in self.regression["bins"]), hi]
        return np.array([(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])], dtype=np.float64)

    def render(self, row: Mapping[str, Any]) -> str:
        """The template filled with one row's input fields (composer.templates.render, as encoding uses)."""
        try:
            return render(self.template, row)
        except TaskError as e:
            raise TaskError(f"task {self.name}: {e}") from None

    def render_target(self, row: Mapping[str, Any]) -> str:
        """The target template filled with one row's fields (generation tasks)."""
        if not self.is_generation:
            raise TaskError(f"task {self.name} is a {self.type} task and has no target; "
                            "set `type: generation` and `target:` in its YAML")
        try:
            return render(self.target, row)
        except TaskError as e:
            raise TaskError(f"task {self.name}: target {e}") from None

    def render_references(self, row: Mapping[str, Any]) -> list[str]:
        """The strings a generation is scored against: row[references] if the task names one, else [target]."""
        if self.references is None:
            return [self.render_target(row)]
        refs = row.get(self.references)
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise TaskError(f"task {self.name}: row has no references in column {self.references!r}; "
                            "fix the data or drop `references:` from the YAML")
        return [str(r) for r in refs]

    def to_dict(self) -> dict[str, Any]:
        """The YAML fields (for `task show` and round trips)."""
        d = asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | Path | None = None) -> TaskSpec:
        """Build from a parsed YAML mapping; unknown keys warn, missing required ones raise."""
        where = f" in {path}" if path else ""
        name = d.get("name") or (Path(path).stem if path else None)
        classification = d.get("type") in (None, "classification")  # an unknown type is validate()'s to report
        required = [k for k in REQUIRED if k != "labels" or classification]
        for key in ("name", *required):
            if (d.get(key) if key != "name" else name) in (None, "", [], {}):
                raise TaskError(
                    f"task {name or '?'}{where} is missing the required field '{key}'; "
                    f"add `{key}:` (see docs/CONTRACTS.md for the schema)"
                )
        known = {f.name for f in fields(cls)} - {"path"}
        unknown = sorted(set(d) - known)
        if unknown:
            log.warning("task %s%s: ignoring unknown keys %s", name, where, ", ".join(unknown))
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["name"] = name
        return cls(**kwargs, path=str(path) if path else None)


def _fail(spec_name: str, field_name: str, problem: str, fix: str) -> TaskError:
    return TaskError(f"task {spec_name}: field '{field_name}' {problem}; {fix}")


def _check_str_list(name: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(name, key, f"is {value!r}", "give a non-empty list of non-empty strings")
    return value


def validate(spec: TaskSpec) -> None:
    """Check every field of ``spec`` (normalising labels in place); raise TaskError naming the field."""
    n = spec.name
    if not isinstance(n, str) or not _NAME_RE.match(n):
        raise TaskError(f"task name {n!r} is not valid; use letters, digits, '-', '_' or '.'")
    if spec.type not in TASK_TYPES:
        raise _fail(n, "type", f"is unknown ({spec.type!r})", f"choose one of {', '.join(TASK_TYPES)}")
    spec.inputs = _check_str_list(n, "inputs", spec.inputs)
    odd = [f for f in spec.inputs if not re.fullmatch(r"\w+", f)]
    if odd:
        raise _fail(n, "inputs", f"has {odd[0]!r}, not a plain identifier",
                    "rename the column with data.field_map, e.g. {'#1 String': sentence1}")
    if spec.is_generation:
        _validate_generation(spec)
    else:
        _validate_labels(spec)
    if spec.template is None:
        spec.template = " ".join("{" + f + "}" for f in spec.inputs)
    if not isinstance(spec.template, str):
        raise _fail(n, "template", f"is {spec.template!r}", "give a string such as \"{sentence}\"")
    try:
        used = template_fields(spec.template)
    except TemplateError as e:
        raise _fail(n, "template", e.problem, e.fix) from None
    bad = sorted(set(used) - set(spec.inputs))
    if bad:
        raise _fail(n, "template", f"uses {bad} which are not in inputs {spec.inputs}",
                    "add them to `inputs` or fix the placeholder names")
    if not _pos_int(spec.max_length):
        raise _fail(n, "max_length", f"is {spec.max_length!r}", "give a positive number of tokens")
    if spec.few_shot is not None:
        fs = spec.few_shot
        if not isinstance(fs, dict) or not _pos_int(fs.get("k")) or not isinstance(fs.get("seed", 0), int):
            raise _fail(n, "few_shot", f"is {fs!r}", "write {k: 16, seed: 13} (k a positive integer)")
    _validate_data(spec)


def _validate_labels(spec: TaskSpec) -> None:
    """The fields of a classification (or binned regression) task."""
    n = spec.name
    for key in ("target", "references", "stop", "metrics"):
        if getattr(spec, key) is not None:
            raise _fail(n, key, "applies to generation tasks only",
                        "add `type: generation` (with a `target:` template) or remove it")
    if spec.metric is None:
        spec.metric = "accuracy"
    if spec.label_field is None:
        spec.label_field = "label"
    if not isinstance(spec.labels, list) or not spec.labels:
        raise _fail(n, "labels", f"is {spec.labels!r}",
                    "give the raw label values as a list, e.g. [\"0\", \"1\"]")
    spec.labels = [normalize_label(v) for v in spec.labels]
    dupes = sorted(k for k, c in Counter(spec.labels).items() if c > 1)
    if dupes:
        raise _fail(n, "labels", f"repeats {dupes}", "list each label once")
    C = len(spec.labels)
    if spec.label_words is None:
        spec.label_words = [" " + lab for lab in spec.labels]
    spec.label_words = _check_str_list(n, "label_words", spec.label_words)
    if len(spec.label_words) != C:
        raise _fail(n, "label_words", f"has {len(spec.label_words)} entries but labels has {C}",
                    "give one word per label, in the order of `labels`")
    if spec.label_descriptions is None:
        spec.label_descriptions = [w.strip() for w in spec.label_words]
    spec.label_descriptions = _check_str_list(n, "label_descriptions", spec.label_descriptions)
    if len(spec.label_descriptions) != C:
        raise _fail(n, "label_descriptions", f"has {len(spec.label_descriptions)} entries but labels has {C}",
                    "give one description per label, in the order of `labels`")
    if spec.metric in GENERATION_METRICS:
        raise _fail(n, "metric", f"is {spec.metric}, a generation metric, but the task is a classification task",
                    f"use one of {', '.join(METRICS)}, or set `type: generation` with a `target:`")
    if spec.metric not in METRICS:
        raise _fail(n, "metric", f"is unknown ({spec.metric!r})", f"choose one of {', '.join(METRICS)}")
    if spec.head is not None and spec.head not in HEADS:
        raise _fail(n, "head", f"is unknown ({spec.head!r})",
                    f"choose one of {', '.join(HEADS)} or leave it null")
    if not isinstance(spec.label_field, str) or not spec.label_field:
        raise _fail(n, "label_field", f"is {spec.label_field!r}", "name the column that holds the label")
    if spec.regression is not None:
        _validate_regression(spec)
    elif spec.metric in ("pearson", "spearman"):
        raise _fail(n, "metric", f"is {spec.metric} but the task has no `regression` block",
                    "add `regression: {field: score, bins: [...]}` or use accuracy/f1/matthews")


def _validate_generation(spec: TaskSpec) -> None:
    """The fields of a generation task: a target template, generation metrics, no labels."""
    n = spec.name
    for key in ("labels", "label_words", "label_descriptions", "label_field", "head", "regression"):
        if getattr(spec, key) not in (None, []):
            raise _fail(n, key, "does not apply to a generation task",
                        "remove it (the `target:` template says what to generate)")
    if spec.target is None:
        raise _fail(n, "target", "is missing for a generation task",
                    "give a target template over data columns, e.g. target: \" {answer}\"")
    if not isinstance(spec.target, str):
        raise _fail(n, "target", f"is {spec.target!r}", "give a template string such as \" {answer}\"")
    try:
        fields_used = template_fields(spec.target)
    except TemplateError as e:
        raise _fail(n, "target", e.problem, e.fix) from None
    if not fields_used:
        raise _fail(n, "target", f"is {spec.target!r}, which uses no data field",
                    "name the column(s) to generate, e.g. \" {answer}\"")
    if spec.references is not None and (not isinstance(spec.references, str)
                                        or not re.fullmatch(r"\w+", spec.references)):
        raise _fail(n, "references", f"is {spec.references!r}", "name the list column of references, or drop it")
    if not _pos_int(spec.max_target_length):
        raise _fail(n, "max_target_length", f"is {spec.max_target_length!r}", "give a positive number of tokens")
    if spec.stop is not None:
        if isinstance(spec.stop, str):
            spec.stop = [spec.stop]
        spec.stop = _check_str_list(n, "stop", spec.stop)
    metrics = spec.metrics
    if metrics is not None:
        if isinstance(metrics, str):
            metrics = [metrics]
        metrics = _check_str_list(n, "metrics", metrics)
    if spec.metric is None:
        if not metrics:
            raise _fail(n, "metric", "is missing for a generation task",
                        f"choose one of {', '.join(GENERATION_METRICS)}")
        spec.metric = metrics[0]
    for key, m in [("metric", spec.metric), *(("metrics", m) for m in metrics or [])]:
        if m in METRICS:
            raise _fail(n, key, f"has {m}, a classification metric, but the task is a generation task",
                        f"use one of {', '.join(GENERATION_METRICS)}")
        if m not in GENERATION_METRICS:
            raise _fail(n, key, f"is unknown ({m!r})", f"choose one of {', '.join(GENERATION_METRICS)}")
    if metrics is not None:
        if spec.metric not in metrics:
            raise _fail(n, "metrics", f"is {metrics} and lacks the main metric {spec.metric!r}",
                        "list it first, or drop `metric:` (the first of `metrics` is the main one)")
        dupes = sorted(k for k, c in Counter(metrics).items() if c > 1)
        if dupes:
            raise _fail(n, "metrics", f"repeats {dupes}", "list each metric once")
        metrics = [spec.metric, *(m for m in metrics if m != spec.metric)]
    spec.metrics = metrics


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _validate_regression(spec: TaskSpec) -> None:
    n, r = spec.name, spec.regression
    fix = "write {field: score, bins: [2.5], range: [0, 5]} with increasing bins"
    if not isinstance(r, dict) or not isinstance(r.get("field"), str):
        raise _fail(n, "regression", f"is {r!r}", fix)
    bins = r.get("bins")
    if (not isinstance(bins, list) or not bins or not all(isinstance(b, (int, float)) for b in bins)
            or any(a >= b for a, b in zip(bins, bins[1:]))):
        raise _fail(n, "regression.bins", f"is {bins!r}", "give an increasing list of numbers, e.g. [2.5]")
    if len(bins) + 1 != spec.num_labels:
        raise _fail(n, "labels",
                    f"has {spec.num_labels} entries but regression.bins makes {len(bins) + 1} bins",
                    "give one label per bin (len(bins) + 1)")
    rng = r.get("range")
    if rng is not None and (not isinstance(rng, list) or len(rng) != 2 or not rng[0] <= bins[0]
                            or not bins[-1] <= rng[1]):
        raise _fail(n, "regression.range", f"is {rng!r}", "give [lo, hi] enclosing the bins, e.g. [0, 5]")


def _validate_data(spec: TaskSpec) -> None:
    n, d = spec.name, spec.data
    if not isinstance(d, dict):
        raise _fail(n, "data", f"is {d!r}", "give a mapping with `source:` and `splits:`")
    src = d.get("source", "files")
    d["source"] = src
    if src not in SOURCES:
        raise _fail(n, "data.source", f"is unknown ({src!r})", f"choose one of {', '.join(SOURCES)}")
    unknown = sorted(set(d) - set(DATA_KEYS))
    if unknown:
        log.warning("task %s: ignoring unknown data keys %s", n, ", ".join(unknown))
    if src == "builtin":
        if not isinstance(d.get("generator"), str):
            raise _fail(n, "data.generator", "is missing",
                        "name a generator of composer.suite (e.g. polarity)")
        return
    splits = d.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise _fail(n, "data.splits", f"is {splits!r}",
                    "map split names to files, e.g. {train: path/train.tsv}")
    if src == "hub":
        if not isinstance(d.get("path"), str):
            raise _fail(n, "data.path", "is missing", "give the hub dataset id, e.g. `path: glue`")
        return
    for split in splits:
        cfg = split_config(spec, split)
        where = f"data.splits.{split}"
        if not isinstance(cfg.get("path"), str) or not cfg["path"]:
            raise _fail(n, where, f"is {splits[split]!r}", "give a path relative to the data directory")
        if cfg["format"] not in FORMATS:
            raise _fail(n, f"{where}.format" if "format" in split_entry(splits[split]) else "data.format",
                        f"is unknown ({cfg['format']!r})", f"choose one of {', '.join(FORMATS)}")
        if cfg["format"] in ("csv", "tsv") and not cfg["header"] and not cfg.get("columns"):
            raise _fail(n, "data.columns", f"is missing for headerless {cfg['format']} split '{split}'",
                        "name the columns, e.g. columns: [label, sentence]")
        if cfg.get("quoting") is not None and cfg["quoting"] not in QUOTING:
            raise _fail(n, "data.quoting", f"is {cfg['quoting']!r}", "choose none or minimal")
        for key in ("field_map", "label_map"):
            if cfg.get(key) is not None and not isinstance(cfg[key], dict):
                raise _fail(n, f"data.{key}", f"is {cfg[key]!r}", "give a mapping {old: new}")
    for split in splits:
        cfg = split_config(spec, split)
        if cfg["format"] in DIALOGUE_FORMATS:
            problem = option_problem(cfg["format"], cfg.get("options"))
            if problem:
                raise _fail(n, "data.options", problem, f"see composer/dialogue.py for format {cfg['format']}")
        elif cfg.get("options"):
            raise _fail(n, "data.options", f"is given for format {cfg['format']} (split '{split}')",
                        f"options apply to the formats {', '.join(DIALOGUE_FORMATS)} only; remove it")
    carve = d.get("split")
    if carve is not None:
        ok = isinstance(carve, dict) and set(carve) <= {"from", "seed", *CARVED}
        src_split = carve.get("from", "train") if ok else None
        carved = [s for s in CARVED if s in carve and s != src_split] if ok else []
        fracs = [carve[s] for s in carved]
        fracs_ok = (src_split not in carve and all(isinstance(f, (int, float)) and 0 <= f < 1 for f in fracs)
                    and 0 < sum(fracs) < 1)
        if not ok or src_split not in splits or not fracs_ok:
            raise _fail(n, "data.split", f"is {carve!r}",
                        "write {from: train, dev: 0.1, test: 0.1, seed: 0} (fractions of a declared split)")
        clash = [s for s in carved if s in splits]
        if clash:
            raise _fail(n, "data.split", f"carves {clash[0]!r} which data.splits already declares",
                        f"drop {clash[0]} from one of them")


def split_entry(entry: Any) -> dict[str, Any]:
    """A data.splits entry as a mapping: a bare path becomes {"path": path}."""
    return entry if isinstance(entry, dict) else {"path": entry}


def split_config(spec: TaskSpec, split: str) -> dict[str, Any]:
    """The reader settings for one file split: data-level keys overridden by the split's own."""
    d = spec.data
    cfg: dict[str, Any] = {k: d.get(k) for k in READER_KEYS}
    entry = split_entry(d["splits"][split])
    cfg.update(entry)
    if isinstance(d.get("options"), dict) and isinstance(entry.get("options"), dict):
        cfg["options"] = {**d["options"], **entry["options"]}  # a split's options add to the data-level ones
    cfg["format"] = cfg["format"] or "tsv"
    cfg["header"] = True if cfg["header"] is None else bool(cfg["header"])
    cfg["encoding"] = cfg["encoding"] or "utf-8"
    return cfg


# ----------------------------------------------------------------------------- finding task files

def _catalogue_dirs() -> list[tuple[str, Any | None]]:
    """(label, directory) pairs searched in order: ./tasks, the repo's tasks/, the installed catalogue."""
    dirs: list[tuple[str, Any]] = []
    seen: set[Path] = set()
    for p in (Path.cwd() / "tasks", Path(__file__).resolve().parent.parent / "tasks"):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            dirs.append((str(p), p))
    try:
        pkg = importlib.resources.files("composer.catalog.tasks")
        dirs.append(("the packaged catalogue (composer.catalog.tasks)", pkg))
    except (ModuleNotFoundError, TypeError):
        # a source checkout: the catalogue is the repo's tasks/ above
        dirs.append(("the packaged catalogue (not installed)", None))
    return dirs


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TaskError(f"bad YAML in {where}{at}: {problem}; fix the syntax") from None
    if not isinstance(data, dict):
        raise TaskError(f"task file {where} holds {type(data).__name__}, not a mapping; "
                        "write `name: ...`, `data: ...` etc.")
    return data


def _load_file(path: Path | Any, stem: str) -> TaskSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"task file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise TaskError(f"cannot read task file {path} ({e.strerror or e})") from None
    data = _parse_yaml(text, str(path))
    name = data.get("name")
    if name is not None and name != stem:
        raise TaskError(f"task file {path} has name {name!r}; the name must equal the file stem {stem!r}")
    return TaskSpec.from_dict(data, path=str(path))


def load_task(name_or_path: str | Path) -> TaskSpec:
    """A task by path to a .yaml file, or by name: ./tasks/NAME.yaml, the repo's tasks/, the catalogue."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s:
        if not p.is_file():
            raise TaskError(f"task file {p.resolve()} not found; check the path or give a task name")
        return _load_file(p, p.stem)
    looked = []
    for label, d in _catalogue_dirs():
        looked.append(label)
        if d is not None and (d / f"{s}.yaml").is_file():
            return _load_file(d / f"{s}.yaml", s)
    raise TaskError(f"unknown task {s!r}: not in {', '.join(looked)}; see `prompt-composer task list`")


def list_tasks() -> list[str]:
    """Names of all tasks found in ./tasks, the repo's tasks/ and the packaged catalogue, sorted."""
    names: set[str] = set()
    for _, d in _catalogue_dirs():
        if d is None:
            continue
        try:
            names.update(e.name[: -len(".yaml")] for e in d.iterdir() if e.name.endswith(".yaml"))
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
    return sorted(names)


def resolve_data_dir(explicit: str | Path | None = None) -> Path | None:
    """The data directory: ``explicit``, else $PROMPT_COMPOSER_DATA, else None."""
    raw = explicit if explicit not in (None, "") else os.environ.get(DATA_ENV) or None
    if raw is None:
        return None
    p = Path(raw).expanduser().resolve()
    if not p.is_dir():
        how = "--data-dir" if explicit not in (None, "") else DATA_ENV
        raise TaskError(f"data directory {p} (from {how}) does not exist; "
                        f"{DATA_HINT} pointing at an existing folder")
    return p
