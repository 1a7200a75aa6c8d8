"""composer.tasks and composer.taskdata: specs, readers, splits, k-shot, and every bad input's message.

Real-data checks run when ../shared/data exists next to the repository.
"""
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from composer import tasks as T
from composer.errors import TaskError
from composer.taskdata import check_task, load_splits, sample_k_shot
from composer.tasks import TaskSpec, list_tasks, load_task, normalize_label, resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
TASK_FILES = sorted((REPO / "tasks").glob("*.yaml"))
DATA = REPO.parent / "shared" / "data"
BUILTIN = {"polarity", "negation", "negated-polarity", "topic", "topic-polarity"}
HAVE_SUITE = importlib.util.find_spec("composer.suite") is not None


def spec(**over) -> TaskSpec:
    """A small valid files task over tmp files; keyword arguments replace fields."""
    d = dict(name="toy", data={"source": "files", "format": "csv", "splits": {"train": "train.csv"}},
             inputs=["text"], labels=["0", "1"], label_words=[" bad", " good"])
    d.update(over)
    return TaskSpec.from_dict(d)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- the catalogue

@pytest.mark.parametrize("path", TASK_FILES, ids=[p.stem for p in TASK_FILES])
def test_every_task_file_validates(path):
    raw = yaml.safe_load(path.read_text())
    if raw.get("data", {}).get("source") == "builtin" and not HAVE_SUITE:
        pytest.skip("composer.suite is not written yet")
    s = load_task(path)
    assert s.name == path.stem
    if s.is_generation:
        assert s.target_fields and not s.labels and s.label_words is None and s.metric == s.metric_names[0]
    else:
        assert len(s.label_words) == len(s.labels) == len(s.label_descriptions) == s.num_labels
    assert s.split_names()
    if raw.get("data", {}).get("source") == "files":
        assert all(not Path(T.split_config(s, sp)["path"]).is_absolute() for sp in s.data["splits"])


def test_real_tasks_cover_the_brief():
    names = set(list_tasks())
    wanted = {"sst2", "cola", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "boolq", "cb", "copa", "wic", "mr",
              "cr", "subj", "trec", "agnews", "yelp", "imdb", "snli", "rte-fs", "mrpc-fs", "cb-fs", "boolq-fs",
              "cr-fs", "cola-fs", "sst2-fs", "mr-fs"}
    assert wanted <= names, wanted - names


def test_metrics_follow_glue_convention():
    assert load_task("cola").metric == "matthews"
    assert load_task("mrpc").metric == load_task("qqp").metric == "f1"
    assert load_task("stsb").metric == "spearman"
    assert load_task("rte").metric == "accuracy"


def test_load_task_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "tasks" / "sst2.yaml", yaml.safe_dump(spec(name="sst2", description="local").to_dict()))
    write(tmp_path / "tasks" / "mine.yaml", yaml.safe_dump(spec(name="mine").to_dict()))
    assert load_task("sst2").description == "local"  # ./tasks wins over the catalogue
    assert load_task("rte").name == "rte"  # falls back to the repo's tasks/
    assert {"mine", "sst2", "rte"} <= set(list_tasks())
    assert load_task(str(tmp_path / "tasks" / "mine.yaml")).name == "mine"


def test_packaged_catalogue_is_searched(tmp_path, monkeypatch):
    # a non-editable install has no repo tasks/ dir; only composer.catalog.tasks
    monkeypatch.chdir(tmp_path)
    pkg = write(tmp_path / "pkg" / "only-packaged.yaml", yaml.safe_dump(spec(name="only-packaged").to_dict())).parent
    monkeypatch.setattr(T.importlib.resources, "files", lambda name: pkg)
    assert load_task("only-packaged").name == "only-packaged"
    assert "only-packaged" in list_tasks()


def test_round_trip_to_dict(tmp_path):
    s = load_task("stsb")
    p = write(tmp_path / "stsb.yaml", yaml.safe_dump(s.to_dict()))
    assert load_task(p) == s


def test_defaults_and_normalisation():
    s = TaskSpec.from_dict({"name": "t", "data": {"splits": {"train": "x.tsv"}}, "inputs": ["a", "b"],
                            "labels": [False, True]})
    assert s.labels == ["false", "true"]
    assert s.label_words == [" false", " true"] and s.label_descriptions == ["false", "true"]
    assert s.template == "{a} {b}" and s.metric == "accuracy" and s.data["source"] == "files"
    assert [normalize_label(v) for v in (True, 0, 1.0, " x ", 2.5)] == ["true", "0", "1", "x", "2.5"]
    assert s.render({"a": "hi", "b": "there"}) == "hi there"


# ----------------------------------------------------------------------------- readers

def test_csv_with_header_and_quotes(tmp_path):
    write(tmp_path / "train.csv", 'text,label\n"a, quoted",1\nplain,0\n')
    ds = load_splits(spec(), tmp_path)["train"]
    assert ds["text"] == ["a, quoted", "plain"] and ds["label"] == [1, 0]
    assert set(ds.column_names) == {"text", "label"}


def test_tsv_quote_none_bom_crlf_and_ragged_rows(tmp_path):
    # GLUE tsv: a lone '"' must stay literal; MRPC starts with a BOM; some files end lines with \r\n
    write(tmp_path / "d.tsv", '\ufeffQuality\t#1 String\t#2 String\r\n1\t" he said\tok\textra\r\n0\tx\ty\r\n')
    s = spec(data={"source": "files", "format": "tsv", "splits": {"train": "d.tsv"},
                   "field_map": {"Quality": "label", "#1 String": "s1", "#2 String": "s2"}},
             inputs=["s1", "s2"])
    ds = load_splits(s, tmp_path)["train"]
    assert ds["s1"] == ['" he said', "x"] and ds["s2"] == ["ok", "y"] and ds["label"] == [1, 0]


def test_tsv_without_header(tmp_path):
    write(tmp_path / "c.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one one.\n")
    s = spec(data={"source": "files", "format": "tsv", "header": False, "columns": ["src", "label", "mark", "text"],
                   "splits": {"train": "c.tsv"}})
    assert load_splits(s, tmp_path)["train"]["text"] == ["Good one.", "Bad one one."]


def test_lines_cp1252_and_tab_delimited(tmp_path):
    # 0x85 is "…" in cp1252 and must not split the line (str.splitlines would)
    (tmp_path / "mr.all").write_bytes(b"0 dull \x85 and long \n1 fine film\n\n")
    s = spec(data={"source": "files", "format": "lines", "encoding": "cp1252", "columns": ["label", "text"],
                   "splits": {"train": "mr.all"}})
    assert load_splits(s, tmp_path)["train"]["text"] == ["dull \u2026 and long", "fine film"]
    write(tmp_path / "nli", "entailment\tA man sleeps .\tA person rests .\n")
    s = spec(data={"source": "files", "format": "lines", "delimiter": "\t", "columns": ["label", "p", "h"],
                   "splits": {"train": "nli"}}, inputs=["p", "h"], labels=["entailment", "neutral"])
    ds = load_splits(s, tmp_path)["train"]
    assert ds["p"] == ["A man sleeps ."] and ds["h"] == ["A person rests ."]


def test_json_list_dict_of_records_and_jsonl(tmp_path):
    write(tmp_path / "l.json", json.dumps([{"text": "a", "label": 1}]))
    write(tmp_path / "d.json", json.dumps({"0": {"text_a": "b", "label": "0"}, "1": {"text_a": "c", "label": "1"}}))
    write(tmp_path / "r.jsonl", '{"text": "d", "label": true}\n\n{"text": "e", "label": false}\n')
    s = spec(data={"source": "files", "format": "json", "field_map": {"text_a": "text"},
                   "splits": {"train": "l.json", "dev": {"path": "d.json", "records": "values"},
                              "test": {"path": "r.jsonl", "format": "jsonl",
                                       "label_map": {"true": "1", "false": "0"}}}})
    ds = load_splits(s, tmp_path)
    assert ds["train"]["text"] == ["a"] and ds["dev"]["text"] == ["b", "c"] and ds["dev"]["label"] == [0, 1]
    assert ds["test"]["label"] == [1, 0]


def test_folders_with_label_map(tmp_path):
    write(tmp_path / "imdb" / "neg" / "1_2.txt", "awful")
    write(tmp_path / "imdb" / "pos" / "2_9.txt", "lovely")
    s = spec(data={"source": "files", "format": "folders", "label_map": {"neg": "0", "pos": "1"},
                   "splits": {"train": "imdb"}})
    ds = load_splits(s, tmp_path)["train"]
    assert ds["text"] == ["awful", "lovely"] and ds["label"] == [0, 1]


def test_regression_bins_keep_the_score(tmp_path):
    write(tmp_path / "train.csv", "text,score\na,0.5\nb,2.5\nc,4.9\n")
    s = spec(labels=["low", "high"], metric="spearman", regression={"field": "score", "bins": [2.5], "range": [0, 5]})
    ds = load_splits(s, tmp_path)["train"]
    assert ds["label"] == [0, 1, 1] and ds["score"] == [0.5, 2.5, 4.9]
    assert s.bin_centers().tolist() == [1.25, 3.75]


def test_carved_splits_are_deterministic_and_disjoint(tmp_path):
    write(tmp_path / "all.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(100)))
    s = spec(data={"source": "files", "format": "csv", "splits": {"train": "all.csv"},
                   "split": {"dev": 0.1, "test": 0.2, "seed": 0}})
    assert s.split_names() == ["train", "dev", "test"]
    a, b = load_splits(s, tmp_path), load_splits(s, tmp_path)
    assert [len(a[k]) for k in ("train", "dev", "test")] == [70, 10, 20]
    texts = [set(a[k]["text"]) for k in ("train", "dev", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert a["dev"]["text"] == b["dev"]["text"]
    assert list(load_splits(s, tmp_path, splits=["dev"])) == ["dev"]


def test_k_shot_is_deterministic_per_class(tmp_path):
    write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{int(i < 30)}\n" for i in range(100)))
    s = spec()
    a = load_splits(s, tmp_path, k_shot=4, seed=13)["train"]
    assert sorted(a["label"]) == [0] * 4 + [1] * 4
    assert a["text"] == load_splits(s, tmp_path, k_shot=4, seed=13)["train"]["text"]
    assert a["text"] != load_splits(s, tmp_path, k_shot=4, seed=14)["train"]["text"]
    s2 = spec(few_shot={"k": 2, "seed": 1})
    assert len(load_splits(s2, tmp_path)["train"]) == 4  # the YAML default
    assert len(load_splits(s2, tmp_path, k_shot=0)["train"]) == 100  # 0 = all rows
    assert sample_k_shot([0, 1, 1, 0], 1, seed=0) == sample_k_shot([0, 1, 1, 0], 1, seed=0)


def test_hub_source_calls_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [0, 1], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    s = spec(data={"source": "hub", "path": "glue", "name": "sst2", "splits": {"dev": "validation"}},
             inputs=["sentence"])
    ds = load_splits(s)["dev"]
    assert calls == [("glue", "sst2", "validation")] and ds["label"] == [0, 1]


def test_builtin_source_calls_suite_generate(monkeypatch):
    fake = types.ModuleType("composer.suite")
    fake.generate = lambda name, split, seed=0: [{"text": f"{name}-{split}-{seed}", "label": "1"}]
    monkeypatch.setitem(sys.modules, "composer.suite", fake)
    import composer

    monkeypatch.setattr(composer, "suite", fake, raising=False)
    monkeypatch.setattr("composer.taskdata.suite", fake)  # taskdata imports the suite at the top
    s = spec(data={"source": "builtin", "generator": "polarity", "seed": 3})
    ds = load_splits(s, seed=5)  # the run's seed does not change generated rows
    assert list(ds) == ["train", "dev", "test"] and ds["dev"]["text"] == ["polarity-dev-3"]
    assert load_splits(spec(data={"source": "builtin", "generator": "g"}), splits=["test"])["test"]["text"] == ["g-test-0"]


def test_check_task_summary(tmp_path):
    write(tmp_path / "train.csv", "text,label\na,1\nb,0\nc,1\n")
    r = check_task(spec(), tmp_path)
    assert r["splits"]["train"] == {"rows": 3, "labels": {"0": 1, "1": 2}} and r["num_labels"] == 2


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPT_COMPOSER_DATA", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("PROMPT_COMPOSER_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    sub = tmp_path / "x"
    sub.mkdir()
    assert resolve_data_dir(sub) == sub.resolve()  # explicit wins
    with pytest.raises(TaskError, match="does not exist") as e:
        resolve_data_dir(tmp_path / "nope")
    assert "--data-dir" in one_line(e)


# ----------------------------------------------------------------------------- bad inputs

def test_unknown_task_name():
    with pytest.raises(TaskError, match="unknown task 'sst3': not in .*tasks.*packaged catalogue") as e:
        load_task("sst3")
    assert "task list" in one_line(e)


def test_missing_task_file():
    with pytest.raises(TaskError, match="task file .*nope.yaml not found"):
        load_task("nope.yaml")


def test_missing_required_field(tmp_path):
    p = write(tmp_path / "t.yaml", "name: t\ndata: {splits: {train: a.csv}}\ninputs: [text]\n")
    with pytest.raises(TaskError, match="task t in .* is missing the required field 'labels'; add `labels:`") as e:
        load_task(p)
    one_line(e)


def test_bad_yaml(tmp_path):
    p = write(tmp_path / "t.yaml", "name: t\ninputs: [text\nlabels: [0, 1]\n")
    with pytest.raises(TaskError, match=r"bad YAML in .*t.yaml at line \d+.*fix the syntax") as e:
        load_task(p)
    one_line(e)
    p = write(tmp_path / "u.yaml", "- just\n- a list\n")
    with pytest.raises(TaskError, match="not a mapping"):
        load_task(p)


def test_name_must_equal_stem(tmp_path):
    p = write(tmp_path / "t.yaml", yaml.safe_dump(spec(name="other").to_dict()))
    with pytest.raises(TaskError, match="has name 'other'; the name must equal the file stem 't'"):
        load_task(p)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"metric": "auc"}, "field 'metric' is unknown \\('auc'\\); choose one of accuracy"),
        ({"label_words": [" bad"]}, "field 'label_words' has 1 entries but labels has 2; give one word per label"),
        ({"label_descriptions": ["a", "b", "c"]}, "field 'label_descriptions' has 3 entries but labels has 2"),
        ({"labels": ["0", "0"]}, "field 'labels' repeats \\['0'\\]"),
        ({"template": "{text} {other}"}, "field 'template' uses \\['other'\\] which are not in inputs"),
        ({"inputs": ["#1 String"]}, "field 'inputs' has '#1 String'.*data.field_map"),
        ({"metric": "spearman"}, "no `regression` block"),
        ({"regression": {"field": "s", "bins": [3, 2]}}, "field 'regression.bins'"),
        ({"regression": {"field": "s", "bins": [1, 2]}}, "field 'labels' has 2 entries but regression.bins makes 3"),
        ({"few_shot": {"k": 0}}, "field 'few_shot'"),
        ({"head": "magic"}, "field 'head' is unknown"),
        ({"data": {"source": "ftp"}}, "field 'data.source' is unknown \\('ftp'\\)"),
        ({"data": {"source": "files"}}, "field 'data.splits'"),
        ({"data": {"format": "xml", "splits": {"train": "a"}}}, "field 'data.format' is unknown"),
        ({"data": {"format": "tsv", "header": False, "splits": {"train": "a"}}}, "field 'data.columns' is missing"),
        ({"data": {"splits": {"train": "a"}, "split": {"dev": 1.5}}}, "field 'data.split'"),
        ({"data": {"splits": {"train": "a", "dev": "b"}, "split": {"dev": 0.1}}}, "carves 'dev' which data.splits"),
        ({"data": {"source": "builtin"}}, "field 'data.generator' is missing"),
        ({"data": {"source": "hub", "splits": {"train": "train"}}}, "field 'data.path' is missing"),
    ],
)
def test_bad_fields(over, match):
    with pytest.raises(TaskError, match=match) as e:
        spec(**over)
    assert one_line(e).startswith("task toy: field '") or "task toy" in str(e.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(TaskError) as e:
        load_splits(spec(), tmp_path)
    msg = one_line(e)
    assert str((tmp_path / "train.csv").resolve()) in msg
    assert "--data-dir" in msg and "PROMPT_COMPOSER_DATA" in msg and "split 'train'" in msg


def test_rows_lacking_label_or_input(tmp_path):
    write(tmp_path / "train.csv", "text,lbl\na,1\n")
    with pytest.raises(TaskError, match="row 1 of .*train.csv \\(split 'train'\\) has no label field 'label'") as e:
        load_splits(spec(), tmp_path)
    one_line(e)
    write(tmp_path / "train.csv", "sentence,label\na,1\n")
    with pytest.raises(TaskError, match="has no input field 'text' \\(fields: sentence, label\\)"):
        load_splits(spec(), tmp_path)
    write(tmp_path / "train.tsv", "text\tlabel\na\t1\nshort\n")  # a ragged row without its label
    s = spec(data={"source": "files", "format": "tsv", "splits": {"train": "train.tsv"}})
    with pytest.raises(TaskError, match="row 2 of .* has no label field 'label'"):
        load_splits(s, tmp_path)


def test_label_not_in_spec(tmp_path):
    write(tmp_path / "train.csv", "text,label\na,1\nb,0\nc,2\n")
    with pytest.raises(TaskError, match="label '2' in row 3 of .*train.csv \\(split 'train'\\) is not one of") as e:
        load_splits(spec(), tmp_path)
    assert "add it to `labels`" in one_line(e)


def test_bad_score(tmp_path):
    write(tmp_path / "train.csv", "text,score\na,high\n")
    s = spec(labels=["low", "high"], regression={"field": "score", "bins": [2.5]})
    with pytest.raises(TaskError, match="row 1 of .* has score 'high', not a number"):
        load_splits(s, tmp_path)


def test_empty_split(tmp_path):
    write(tmp_path / "train.csv", "text,label\n")
    with pytest.raises(TaskError, match="split 'train' of task toy is empty .*train.csv") as e:
        load_splits(spec(), tmp_path)
    one_line(e)


def test_k_shot_larger_than_a_class(tmp_path):
    write(tmp_path / "train.csv", "text,label\na,1\nb,0\nc,1\nd,1\n")
    with pytest.raises(TaskError, match="k-shot k=2 exceeds class '0' which has 1 rows in split 'train'") as e:
        load_splits(spec(), tmp_path, k_shot=2)
    assert "at most 1" in one_line(e)


def test_unknown_split_and_bad_json(tmp_path):
    with pytest.raises(TaskError, match="task toy has no split 'val'; choose from train"):
        load_splits(spec(), tmp_path, splits=["val"])
    write(tmp_path / "d.json", json.dumps({"0": {"text": "a", "label": 1}}))
    s = spec(data={"source": "files", "format": "json", "splits": {"train": "d.json"}})
    with pytest.raises(TaskError, match="set `records: values`"):
        load_splits(s, tmp_path)
    write(tmp_path / "r.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    s = spec(data={"source": "files", "format": "jsonl", "splits": {"train": "r.jsonl"}})
    with pytest.raises(TaskError, match="bad JSON on line 2 of .*r.jsonl"):
        load_splits(s, tmp_path)


def test_unknown_keys_warn(caplog):
    with caplog.at_level("WARNING"):
        spec(colour="blue")
    assert "ignoring unknown keys colour" in caplog.text


# ----------------------------------------------------------------------------- the real data

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA} (../shared/data)")
REAL = [p.stem for p in TASK_FILES if p.stem not in BUILTIN
        and yaml.safe_load(p.read_text()).get("data", {}).get("source") == "files"
        and yaml.safe_load(p.read_text()).get("type") != "generation"]  # tests/test_dialogue.py loads those


@pytest.fixture(scope="module")
def loaded():
    cache: dict = {}

    def get(name):
        if name not in cache:
            s = load_task(name)
            cache[name] = (s, load_splits(s, DATA, k_shot=0))
        return cache[name]

    return get


@needs_data
@pytest.mark.parametrize("name", REAL)
def test_real_task_loads(name, loaded):
    s, ds = loaded(name)
    assert list(ds) == s.split_names()
    for split, d in ds.items():
        assert len(d) > 0, split
        labels = np.asarray(d["label"])
        assert labels.min() >= 0 and labels.max() < s.num_labels
        assert set(s.inputs) <= set(d.column_names)
        # text was read, not lost to quoting (CR holds a few empty reviews, one in cr-fs train)
        assert sum(not t for t in d[s.inputs[-1]]) <= max(1, len(d) // 100)
        if s.is_regression:
            assert 0.0 <= min(d["score"]) and max(d["score"]) <= 5.0


@needs_data
@pytest.mark.parametrize(
    "name, split, rows, counts",
    [
        ("sst2", "train", 67349, [29780, 37569]),
        ("sst2", "dev", 872, [428, 444]),
        ("sst2", "test", 1821, [917, 904]),
        ("rte", "dev", 277, None),
        ("cb", "dev", 56, None),
        ("mrpc", "dev", 408, [129, 279]),
        ("mrpc", "train", 3667, [1194, 2473]),
        ("mrpc", "test", 1725, [578, 1147]),
        ("cola", "dev", 1043, [322, 721]),
        ("stsb", "test", 1379, None),
        ("qqp", "dev", 1000, [623, 377]),
        ("mnli", "test", 9815, [3479, 3123, 3213]),
        ("boolq", "dev", 3270, [1237, 2033]),
        ("agnews", "test", 7600, [1900] * 4),
        ("trec", "test", 500, None),
        ("imdb", "test", 1000, [500, 500]),
        ("rte-fs", "train", 32, [16, 16]),
    ],
)
def test_real_counts_match_sources(name, split, rows, counts, loaded):
    s, ds = loaded(name)
    assert len(ds[split]) == rows
    if counts:
        assert np.bincount(ds[split]["label"], minlength=s.num_labels).tolist() == counts


@needs_data
def test_real_carved_splits_cover_the_file(loaded):
    s, ds = loaded("mr")
    assert sum(len(d) for d in ds.values()) == 10662
    assert any("\u2026" in t for t in ds["train"]["sentence"])  # cp1252 ellipsis decoded


@needs_data
def test_real_imdb_labels_agree_across_sources(loaded):
    s, ds = loaded("imdb")
    # USB stores 0 = positive; the task maps it so that 1 = positive everywhere
    pos = [t for t, y in zip(ds["test"]["text"], ds["test"]["label"]) if y == 1]
    assert sum("great" in t.lower() for t in pos) > sum("worst" in t.lower() for t in pos)


@needs_data
def test_real_k_shot_sample(loaded):
    s = load_task("sst2-fs")
    ds = load_splits(s, DATA, splits=["train"], k_shot=8, seed=13)["train"]
    assert np.bincount(ds["label"]).tolist() == [8, 8]


# ----------------------------------------------------------------------------- generation tasks

def gen_spec(**over) -> TaskSpec:
    """A small valid generation task over a tmp jsonl file; keyword arguments replace fields."""
    d = {"name": "gen", "type": "generation",
         "data": {"source": "files", "format": "jsonl", "splits": {"train": "train.jsonl"}},
         "inputs": ["question"], "template": "Q: {question} A:", "target": " {answer}", "metric": "exact_match"}
    d.update(over)
    return TaskSpec.from_dict(d)


def write_qa(path: Path, n: int, **extra) -> Path:
    rows = [{"question": f"q{i}", "answer": f"a{i}", **{k: v(i) for k, v in extra.items()}} for i in range(n)]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_generation_spec_fields_and_defaults():
    s = gen_spec(metrics=["token_f1", "exact_match"], stop="\n")
    assert s.is_generation and not s.is_regression and s.target_fields == ["answer"]
    assert s.labels == [] and s.num_labels == 0 and s.label_words is None and s.label_field is None
    assert s.metric == "exact_match" and s.metrics == ["exact_match", "token_f1"]  # the main one first
    assert s.metric_names == ["exact_match", "token_f1"] and s.stop == ["\n"] and s.max_target_length == 64
    assert s.render({"question": "why"}) == "Q: why A:" and s.render_target({"answer": "because"}) == " because"
    assert s.render_references({"answer": "x"}) == [" x"]
    r = gen_spec(references="answers")
    assert r.render_references({"answer": "x", "answers": ["x", "y"]}) == ["x", "y"]
    only = gen_spec(metric=None, metrics=["rouge_l", "bleu"])
    assert only.metric == "rouge_l"
    c = spec()
    assert not c.is_generation and c.type == "classification" and c.metric_names == ["accuracy"]
    with pytest.raises(TaskError, match="task toy is a classification task and has no target") as e:
        c.render_target({"text": "x"})
    one_line(e)


def test_generation_round_trip(tmp_path):
    s = gen_spec(name="gen", metrics=["exact_match", "token_f1"], stop=["\n"], references="answers",
                 few_shot={"k": 4, "seed": 1})
    p = write(tmp_path / "gen.yaml", yaml.safe_dump(s.to_dict()))
    assert load_task(p) == s
    c = load_task("sst2")
    assert c.to_dict()["type"] == "classification"
    q = write(tmp_path / "sst2.yaml", yaml.safe_dump(c.to_dict()))
    assert load_task(q) == c


def test_generation_needs_no_labels(tmp_path):
    p = write(tmp_path / "g.yaml", "name: g\ntype: generation\ndata: {splits: {train: a.jsonl}, format: jsonl}\n"
                                   "inputs: [question]\ntarget: '{answer}'\nmetric: exact_match\n")
    assert load_task(p).labels == []


@pytest.mark.parametrize(
    "over, match",
    [
        ({"labels": ["0", "1"]}, "field 'labels' does not apply to a generation task; remove it"),
        ({"label_words": [" a"]}, "field 'label_words' does not apply to a generation task"),
        ({"label_descriptions": ["a"]}, "field 'label_descriptions' does not apply"),
        ({"label_field": "label"}, "field 'label_field' does not apply"),
        ({"head": "verbalizer"}, "field 'head' does not apply to a generation task"),
        ({"regression": {"field": "s", "bins": [1]}}, "field 'regression' does not apply"),
        ({"target": None}, "field 'target' is missing for a generation task"),
        ({"target": 3}, "field 'target' is 3"),
        ({"target": "constant"}, "field 'target' is 'constant', which uses no data field"),
        ({"target": "{answer!r}"}, "field 'target' has a conversion"),
        ({"target": "{answer"}, "field 'target' cannot be parsed"),
        ({"metric": "accuracy"}, "field 'metric' has accuracy, a classification metric, but the task is a generation"),
        ({"metric": "meteor"}, "field 'metric' is unknown \\('meteor'\\); choose one of exact_match"),
        ({"metric": None}, "field 'metric' is missing for a generation task"),
        ({"metrics": ["token_f1", "f1"]}, "field 'metrics' has f1, a classification metric"),
        ({"metrics": ["token_f1"]}, "field 'metrics' is \\['token_f1'\\] and lacks the main metric 'exact_match'"),
        ({"metrics": ["exact_match", "exact_match"]}, "field 'metrics' repeats"),
        ({"max_target_length": 0}, "field 'max_target_length' is 0; give a positive number"),
        ({"stop": [""]}, "field 'stop' is \\[''\\]"),
        ({"references": "a b"}, "field 'references' is 'a b'"),
        ({"type": "ranking"}, "field 'type' is unknown \\('ranking'\\); choose one of classification, generation"),
        ({"data": {"format": "woz", "options": {"view": "acts"}, "splits": {"train": "a.json"}}},
         "field 'data.options' view is 'acts'; choose one of state, response"),
        ({"data": {"format": "woz", "options": {"colour": 1}, "splits": {"train": "a.json"}}},
         "field 'data.options' has 'colour', which format woz does not take"),
        ({"data": {"format": "woz", "options": {"history": 0}, "splits": {"train": "a.json"}}},
         "history is 0"),
        ({"data": {"format": "squad", "options": {"part": [0.5, 0.2]}, "splits": {"train": "a.json"}}},
         "part is \\[0.5, 0.2\\]"),
        ({"data": {"format": "jsonl", "options": {"view": "state"}, "splits": {"train": "a.jsonl"}}},
         "field 'data.options' is given for format jsonl"),
    ],
)
def test_bad_generation_fields(over, match):
    with pytest.raises(TaskError, match=match) as e:
        gen_spec(**over)
    assert one_line(e).startswith("task gen: field '")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"metric": "bleu"}, "field 'metric' is bleu, a generation metric, but the task is a classification task"),
        ({"target": "{text}"}, "field 'target' applies to generation tasks only; add `type: generation`"),
        ({"metrics": ["accuracy"]}, "field 'metrics' applies to generation tasks only"),
        ({"stop": ["\n"]}, "field 'stop' applies to generation tasks only"),
    ],
)
def test_generation_fields_on_a_classification_task(over, match):
    with pytest.raises(TaskError, match=match) as e:
        spec(**over)
    one_line(e)


def test_generation_load_splits_columns(tmp_path):
    write_qa(tmp_path / "train.jsonl", 5, answers=lambda i: [f"a{i}", f"b{i}"], extra=lambda i: "x")
    ds = load_splits(gen_spec(references="answers"), tmp_path)["train"]
    assert ds.column_names == ["question", "answer", "answers"]  # inputs, target fields, references; no label
    assert ds["answer"][:2] == ["a0", "a1"] and ds["answers"][1] == ["a1", "b1"]
    # a field used by both template and target is one column
    same = gen_spec(inputs=["answer"], template="{answer}", target=" {answer}")
    assert load_splits(same, tmp_path)["train"].column_names == ["answer"]


def test_generation_k_shot_is_k_rows_seeded(tmp_path):
    write_qa(tmp_path / "train.jsonl", 50)
    s = gen_spec()
    a = load_splits(s, tmp_path, k_shot=8, seed=13)["train"]
    assert len(a) == 8 and a["question"] == load_splits(s, tmp_path, k_shot=8, seed=13)["train"]["question"]
    assert a["question"] != load_splits(s, tmp_path, k_shot=8, seed=14)["train"]["question"]
    order = [int(q[1:]) for q in a["question"]]
    assert order == sorted(order)  # kept in file order
    assert len(load_splits(gen_spec(few_shot={"k": 3, "seed": 0}), tmp_path)["train"]) == 3
    with pytest.raises(TaskError, match="k-shot k=51 exceeds the 50 rows of split 'train' of task gen") as e:
        load_splits(s, tmp_path, k_shot=51)
    assert "at most 50" in one_line(e)


def test_generation_rows_lacking_target_or_empty(tmp_path):
    write(tmp_path / "train.jsonl", '{"question": "q", "reply": "r"}\n')
    with pytest.raises(TaskError, match="row 1 of .*train.jsonl \\(split 'train'\\) has no target field 'answer'") as e:
        load_splits(gen_spec(), tmp_path)
    one_line(e)
    write(tmp_path / "train.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "  "}\n')
    with pytest.raises(TaskError, match="row 2 of .* has an empty target \\(' \\{answer\\}' renders to nothing\\)") as e:
        load_splits(gen_spec(), tmp_path)
    one_line(e)
    write(tmp_path / "train.jsonl", '{"question": "q", "answer": "a", "answers": []}\n')
    with pytest.raises(TaskError, match="row 1 of .* has an empty reference in 'answers'"):
        load_splits(gen_spec(references="answers"), tmp_path)


def test_carve_train_from_a_dev_only_set(tmp_path):
    write_qa(tmp_path / "dev.jsonl", 40)
    s = gen_spec(data={"source": "files", "format": "jsonl", "splits": {"dev": "dev.jsonl"},
                       "split": {"from": "dev", "train": 0.25, "seed": 0}})
    assert s.split_names() == ["train", "dev"]
    ds = load_splits(s, tmp_path)
    assert [len(ds[k]) for k in ("train", "dev")] == [10, 30]
    assert not set(ds["train"]["question"]) & set(ds["dev"]["question"])
    with pytest.raises(TaskError, match="field 'data.split'"):
        gen_spec(data={"source": "files", "format": "jsonl", "splits": {"dev": "dev.jsonl"},
                       "split": {"from": "dev", "dev": 0.2}})


def test_check_task_generation_summary(tmp_path):
    write_qa(tmp_path / "train.jsonl", 3, answers=lambda i: ["x"] * (i + 1))
    r = check_task(gen_spec(references="answers", metrics=["exact_match", "token_f1"]), tmp_path)
    assert r["type"] == "generation" and r["metrics"] == ["exact_match", "token_f1"] and "num_labels" not in r
    assert r["splits"]["train"] == {"rows": 3, "target_words": {"min": 1, "mean": 1.0, "max": 1}, "references": 2.0}
