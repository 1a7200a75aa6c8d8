"""Hostile and careless input (issue 23): refused up front in one line, nothing of the user's lost, no traceback."""
from __future__ import annotations

import fcntl
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from composer.library import Library

TINY = ["--steps", "2", "--eval-every", "2", "--prompt-length", "4", "--batch-size", "8", "--quiet"]


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def one_line(r, code=1) -> str:
    """The error a user sees: exit ``code``, one line on stderr, no traceback anywhere."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and not (r.exception and not isinstance(r.exception, SystemExit)), r.output
    err = r.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err, err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (path -> bytes): compared before and after a refused command."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from an empty folder, so runs/ (the default run folders) lands there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _no_work(monkeypatch):
    """Any model load or data load fails the test: a refusal must come before them."""
    import composer.multitask as M
    import composer.train as T

    def boom(*a, **k):
        raise AssertionError("work started before the input was checked")

    for mod in (T, M):
        monkeypatch.setattr(mod, "load_backbone", boom)
        monkeypatch.setattr(mod, "load_splits", boom)


# -- 1. names are checked before any work ------------------------------------------------------------
BAD_NAMES = [
    ("/abs/dir", "it is a path"),
    ("../x", "it is a path"),
    ("a/b", "it is a path"),
    ("", "it is empty"),
    ("x" * 300, "300 characters long"),
    ("-dash", "starts with '-'"),
    ("héllo", "only ASCII"),
    ("two words", "holds ' '"),
    (".hidden", "must start with a letter or digit"),
    ("a..b", "holds '..'"),
]


@pytest.mark.parametrize("name,why", BAD_NAMES)
def test_train_save_name_is_checked_before_any_work(name, why, toy_task, tiny_bert_dir, in_tmp, monkeypatch):
    _no_work(monkeypatch)
    err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--save", name, *TINY, ok=False))
    assert err.startswith("Error: bad --save ") and why in err
    if len(name) <= 128:
        assert repr(name) in err  # the message names the value
    assert list(in_tmp.iterdir()) == []  # no run folder (runs/NAME, or NAME itself as a path)


def test_save_as_a_path_leaves_the_folder_byte_identical(toy_task, tiny_bert_dir, tmp_path, in_tmp):
    """The issue's reproduction: --save /that/folder used to replace its best/ and checkpoint/."""
    mine = tmp_path / "mine"
    (mine / "best").mkdir(parents=True)
    (mine / "best" / "notes.txt").write_text("my work")
    (mine / "config.json").write_text('{"mine": true}')
    before = snapshot(mine)
    err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--save", mine, *TINY, ok=False))
    assert "it is a path" in err and str(mine) in err
    assert snapshot(mine) == before


def test_run_dir_that_is_not_a_run_folder_is_refused(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    mine = tmp_path / "project"
    (mine / "best").mkdir(parents=True)
    (mine / "best" / "keep.txt").write_text("keep")
    (mine / "config.json").write_text('{"model_type": "bert"}')  # a model folder's config is not a run's
    before = snapshot(mine)
    _no_work(monkeypatch)
    err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--run-dir", mine, *TINY, ok=False))
    assert "is not a run folder" in err and str(mine) in err
    assert snapshot(mine) == before


@pytest.mark.parametrize("args,msg", [
    (["train", "--multitask", "--tasks", "a,b", "--save-prefix", "a/"], "bad --save-prefix 'a/': it is a path"),
    (["train", "--multitask", "--tasks", "a,b", "--save-prefix", ""], "bad --save-prefix '': it is empty"),
    (["train", "--multitask", "--tasks", "a,b", "--save-prefix", "-x"], "bad --save-prefix '-x': it starts"),
    (["compose", "demo", "--target", "negated-polarity", "--save", "../x"], "bad --save '../x': it is a path"),
    (["compose", "demo", "--target", "negated-polarity", "--save", ""], "bad --save '': it is empty"),
    (["library", "import-peft", "no-such-dir", "--name", "../x"], "bad --name '../x': it is a path"),
    (["library", "import-peft", "no-such-dir", "--name", "é"], "bad --name 'é'"),
])
def test_every_name_option_is_checked_first(args, msg, in_tmp, monkeypatch):
    _no_work(monkeypatch)
    err = one_line(run(*args, ok=False))
    assert msg in err
    assert list(in_tmp.iterdir()) == []


def test_save_prefix_with_a_task_name_is_checked_before_training(toy_task, tiny_bert_dir, tmp_path, in_tmp,
                                                                  monkeypatch):
    from tests.conftest import write_toy_task

    other = write_toy_task(tmp_path, name="toy2", seed=1)
    _no_work(monkeypatch)
    err = one_line(run("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir,
                       "--save-prefix", "p" * 128, *TINY, ok=False))
    assert "PREFIX+TASK must fit in 128" in err
    err = one_line(run("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir,
                       "--save-prefix", "p" * 125, *TINY, ok=False))
    assert "--save-prefix name for task 'toy2'" in err and "129 characters long" in err
    assert list(in_tmp.iterdir()) == []


def test_unwritable_library_is_refused_before_training(toy_task, tiny_bert_dir, tmp_path, in_tmp, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _no_work(monkeypatch)
    err = _usage_error(run("--library", blocker / "lib", "train", toy_task, "--model", tiny_bert_dir, "--save",
                           "ok", *TINY, ok=False))
    assert f"{blocker} is a file, not a folder" in err
    # read-only (os.access is asked: root reads any folder, so the permission bits cannot show it here)
    import composer.library as L

    ro = tmp_path / "ro-lib"
    ro.mkdir()
    real = L.os.access
    monkeypatch.setattr(L.os, "access", lambda p, mode, **kw: real(p, mode, **kw) and not (
        Path(p) == ro and mode & L.os.W_OK))
    err = one_line(run("--library", ro, "train", toy_task, "--model", tiny_bert_dir, "--save", "ok", *TINY, ok=False))
    assert "is not writable" in err and str(ro) in err
    assert list(in_tmp.iterdir()) == []


# -- 2. export-peft --force removes only a previous export ----------------------------------------------
@pytest.fixture
def lib_with_entries(tmp_path):
    lib = Library(tmp_path / "library")
    for n in ("a", "b"):
        lib.save(n, torch.randn(4, 32), {"task": "toy", "backbone": "minilm", "family": "encoder"})
    return lib


def test_export_force_onto_the_library_is_refused(lib_with_entries, tmp_path):
    lib = lib_with_entries
    before = snapshot(lib.root)
    for target in (lib.root, lib.root / "a", tmp_path):
        err = one_line(run("--library", lib.root, "library", "export-peft", "a", target, "--force", ok=False))
        assert "cannot export prompt 'a'" in err
        assert snapshot(lib.root) == before
    assert sorted(Library(lib.root).names()) == ["a", "b"]


def test_export_force_keeps_a_folder_that_is_not_an_export(lib_with_entries, tmp_path):
    lib = lib_with_entries
    runs = tmp_path / "elsewhere" / "runs"
    (runs / "r1" / "best").mkdir(parents=True)
    (runs / "r1" / "config.json").write_text("{}")
    (runs / "notes.txt").write_text("mine")
    before = snapshot(runs)
    err = one_line(run("--library", lib.root, "library", "export-peft", "a", runs, "--force", ok=False))
    assert "not a previous PEFT export" in err and "notes.txt" in err and "r1/" in err
    assert snapshot(runs) == before
    # an export with a stray file beside it: kept too
    out = tmp_path / "out"
    run("--library", lib.root, "library", "export-peft", "a", out)
    (out / "mine.txt").write_text("mine")
    before = snapshot(out)
    assert "mine.txt" in one_line(run("--library", lib.root, "library", "export-peft", "b", out, "--force", ok=False))
    assert snapshot(out) == before
    # a previous export (and PEFT's own README.md) is replaced
    (out / "mine.txt").unlink()
    (out / "README.md").write_text("# adapter")
    run("--library", lib.root, "library", "export-peft", "b", out, "--force")
    assert (out / "adapter_model.safetensors").exists() and not (out / "README.md").exists()


# -- 3. a run folder is owned by one process ----------------------------------------------------------
def test_second_run_on_a_held_folder_refuses(toy_task, tiny_bert_dir, in_tmp, monkeypatch):
    folder = in_tmp / "runs" / "same"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a") as f:  # another process's run (flock is per open file, so this holds)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with monkeypatch.context() as m:
            _no_work(m)
            err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--save", "same", *TINY, ok=False))
        assert "is in use by another run" in err and "runs/same" in err
        assert [p.name for p in folder.iterdir()] == [".lock"]  # nothing written
        fcntl.flock(f, fcntl.LOCK_UN)
    res = json.loads(run("train", toy_task, "--model", tiny_bert_dir, "--save", "same", *TINY, "--json").stdout)
    assert res["saved"] == "same"
    # the lock is released when the run ends: the folder can be taken again
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_two_real_processes_on_one_save_name_the_second_refuses(toy_task, tiny_bert_dir, in_tmp):
    """Two `prompt-composer train --save same` processes at once (not a lock taken in this process): the second
    refuses in one line and writes nothing; the first's run folder is its own."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen([sys.executable, "-m", "composer", "train", str(toy_task), "--model", str(tiny_bert_dir),
                              "--save", "same", "--steps", "100000", "--eval-every", "100000", "--prompt-length", "4",
                              "--batch-size", "8", "--quiet"], cwd=in_tmp, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock = in_tmp / "runs" / "same" / ".lock"
    try:
        deadline = time.time() + 120
        while True:  # until the first process holds the run folder's lock and trains (its config written)
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run never took its run folder"
            if (lock.parent / "config.json").exists():
                with open(lock, "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        break
            time.sleep(0.2)
        err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--save", "same", *TINY, ok=False))
        assert "is in use by another run" in err and "runs/same" in err
        assert not Library().exists("same")
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first run stops (resumably)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    # what the folder holds is the first run's alone: its settings, none of the second's
    assert json.loads((in_tmp / "runs" / "same" / "config.json").read_text())["steps"] == 100000


# -- 4. numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,msg", [
    (["--k-shot", "-1"], "--k-shot must be positive (training examples per class), got -1"),
    (["--k-shot", "0"], "--k-shot must be positive"),
    (["--max-eval", "0"], "--max-eval must be positive (dev examples evaluated during training), got 0"),
    (["--lr", "inf"], "prompt learning rate must be > 0, got inf"),
    (["--lr", "nan"], "prompt learning rate must be > 0, got nan"),
    (["--label-temperature", "inf"], "--label-temperature must be > 0, got inf"),
    (["--mode", "joint", "--model-lr", "nan"], "--model-lr must be a finite number, got nan"),
])
def test_bad_numbers_are_refused_before_work(args, msg, toy_task, tiny_bert_dir, in_tmp, monkeypatch):
    _no_work(monkeypatch)
    err = one_line(run("train", toy_task, "--model", tiny_bert_dir, *args, "--quiet", ok=False))
    assert msg in err
    assert list(in_tmp.iterdir()) == []


def test_prompt_length_past_the_position_limit_names_it(toy_task, tiny_bert_dir, in_tmp):
    # the tiny BERT has 256 positions; the toy task's max_length is 32
    for kind in ("prompt", "prefix"):
        err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--kind", kind, "--prompt-length", 300,
                           "--steps", 2, "--quiet", ok=False))
        assert "--prompt-length 300 plus the max_length of task 'toy' (32) is 332 positions" in err
        assert "(256)" in err and "at most 224" in err
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").rglob("*.safetensors"))


def test_eval_max_examples_must_be_positive(toy_task, tiny_bert_dir):
    Library().save("p32", torch.zeros(4, 32), {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder"})
    for n in ("0", "-1"):
        err = one_line(run("eval", "p32", "--task", toy_task, "--max-examples", n, ok=False))
        assert f"--max-examples must be a positive number of examples, got {n}" in err
        err = one_line(run("eval", "--matrix", "--tasks", toy_task, "--max-examples", n, ok=False))
        assert "--max-examples must be" in err


def test_nan_loss_names_no_checkpoint_an_earlier_run_left(tmp_path):
    """A checkpoint/ left by an earlier run in the folder is not this run's 'last good checkpoint'."""
    from composer.errors import TrainingError
    from composer.loop import RunFolder, make_accelerator, training_step

    acc = make_accelerator("no", find_unused_parameters=False)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    run_ = RunFolder(tmp_path, acc)
    with pytest.raises(TrainingError, match=r"loss became nan at step 0; no checkpoint was written yet \(lower --lr"):
        training_step(acc, torch.tensor(math.nan), None, 1.0, 0, run_, 1e30)
    run_.checkpointed = True  # after this run's own save_checkpoint
    with pytest.raises(TrainingError, match="the last good checkpoint is in"):
        training_step(acc, torch.tensor(math.inf), None, 1.0, 5, run_, 1e30)


# -- 5. the last resort: no traceback escapes ---------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError("[Errno 36] File name too long: 'x'"), ValueError("bad\nsecond line"),
                                 RuntimeError(""), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")])
def test_unexpected_errors_are_one_line(exc, monkeypatch):
    import composer.tasks as T

    def boom(name):
        raise exc

    monkeypatch.setattr(T, "load_task", boom)
    err = one_line(run("task", "show", "anything", ok=False))
    assert err.startswith(f"Error: {type(exc).__name__}") and err.endswith("(run with --debug for the traceback)")
    assert "second line" not in err
    r = CliRunner().invoke(cli, ["--debug", "task", "show", "anything"])
    assert r.exit_code == 1 and type(r.exception) is type(exc)  # --debug re-raises the original


def test_usage_errors_and_ctrl_c_are_not_swallowed(monkeypatch):
    import composer.tasks as T

    assert run("task", "show", ok=False).exit_code == 2  # click's own usage error

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "load_task", interrupted)
    r = CliRunner().invoke(cli, ["task", "show", "x"])
    assert r.exit_code == 1 and "run with --debug" not in r.output  # click's "Aborted!"


# -- the table: malformed names, specs, data files and graphs ---------------------------------------------
def _fuzz_cases(tmp: Path) -> list[list[str]]:
    d = tmp / "fuzz"
    d.mkdir()
    data = d / "data"
    data.mkdir()
    (data / "latin1.csv").write_bytes("text,label\ncaf\xe9 ok,1\n".encode("latin-1"))
    (data / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (data / "empty.csv").write_text("")
    (data / "rows.jsonl").write_text('[1, 2]\n"a string"\n')
    (data / "header.csv").write_text("text,label,text\na,1,b\n")
    (data / "rows.json").write_text('{"not": "a list"}')
    specs = {
        "notyaml": "name: [unclosed",
        "alist": "- a\n- b\n",
        "empty": "",
        "binary": None,
    }
    for fmt, f in (("csv", "latin1.csv"), ("csv", "binary.csv"), ("csv", "empty.csv"), ("jsonl", "rows.jsonl"),
                   ("csv", "header.csv"), ("json", "rows.json"), ("tsv", "binary.csv"), ("lines", "binary.csv")):
        n = f"data-{fmt}-{f.split('.')[0]}"
        specs[n] = (
            f"name: {n}\ndata:\n  source: files\n  format: {fmt}\n  splits: {{train: {data / f}, dev: {data / f}}}\n"
            "inputs: [text]\ntemplate: '{text}'\nlabel_field: label\nlabels: ['0', '1']\nmetric: accuracy\n")
    paths = []
    for n, text in specs.items():
        p = d / f"{n}.yaml"
        p.write_bytes(b"\x00\xff\xfe" * 20) if text is None else p.write_text(text)
        paths.append(p)
    graphs = {"g-bad": "nodes: [unclosed", "g-list": "- x\n", "g-empty": "", "g-json": "{not json", "g-cycle": CYCLE,
              "g-nodes": "name: n\nnodes: 3\n"}
    gpaths = []
    for n, text in graphs.items():
        p = d / (f"{n}.json" if n == "g-json" else f"{n}.yaml")
        p.write_text(text)
        gpaths.append(p)
    cases = [["task", "show", str(p)] for p in paths if not p.name.startswith("data-")]
    cases += [["task", "check", str(p)] for p in paths]
    cases += [["graph", "show", str(p)] for p in gpaths if "cycle" not in p.name]  # show draws any graph
    cases += [["graph", "validate", str(p)] for p in gpaths]
    cases += [["compose", str(p), "--target", "t"] for p in gpaths]
    for name, _ in BAD_NAMES + [("a\nb", ""), ("\x00", ""), (" ", ""), ("ok", "")]:
        cases += [["library", "show", name], ["library", "rm", name], ["eval", name],
                  ["train", "toy", "--save", name, "--steps", "0"]]
    cases += [["train", "sst2", "--steps", s] for s in ("-1", "x", "1e9999", "")]
    cases += [["eval", "x", "--max-examples", s] for s in ("0", "-5", "nan")]
    return cases


def test_fuzz_table_is_answered_in_one_line(tmp_path, in_tmp, monkeypatch):
    _no_work(monkeypatch)
    lib = Library()
    lib.save("keep", torch.randn(4, 32), {"task": "toy", "backbone": "minilm", "family": "encoder"})
    before = snapshot(lib.root)
    for args in _fuzz_cases(tmp_path):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code in (1, 2), (args, r.exit_code, r.output)
        assert "Traceback" not in r.output and not (r.exception and not isinstance(r.exception, SystemExit)), \
            (args, r.output)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
        if args[:2] == ["graph", "validate"] and r.exit_code == 1 and not errors:
            assert r.stderr.strip(), args  # validate lists its faults, one per line
        else:
            assert len(errors) == 1, (args, r.stderr)
            if r.exit_code == 1:
                assert "\n" not in r.stderr.strip(), (args, r.stderr)
        assert snapshot(lib.root) == before, args
    assert list(in_tmp.iterdir()) == []


# -- 6. data, library, graphs, backbones -------------------------------------------------------------
def _files_task(tmp: Path, name: str, fmt: str, text: bytes, encoding: str | None = None) -> Path:
    data = tmp / f"{name}.{fmt}"
    data.write_bytes(text)
    enc = f"  encoding: {encoding}\n" if encoding else ""
    spec = tmp / f"{name}.yaml"
    spec.write_text(f"name: {name}\ndata:\n  source: files\n  format: {fmt}\n{enc}  splits: {{train: {data}}}\n"
                    "inputs: [text]\ntemplate: '{text}'\nlabel_field: label\nlabels: ['0', '1']\n"
                    "metric: accuracy\n")
    return spec


def test_duplicated_header_column_is_refused(tmp_path):
    for fmt, sep in (("csv", ","), ("tsv", "\t")):
        spec = _files_task(tmp_path, f"dup-{fmt}", fmt, sep.join(["text", "label", "text"]).encode() + b"\na" +
                           sep.encode() + b"1" + sep.encode() + b"b\n")
        err = one_line(run("task", "check", spec, ok=False))
        assert "the header names column 'text' twice (columns 1 and 3)" in err and f"dup-{fmt}.{fmt}" in err


def test_file_in_another_encoding_names_file_offset_and_field(tmp_path):
    text = "text,label\n" + "plain,0\n" * 100 + "caf\xe9,1\n"
    spec = _files_task(tmp_path, "latin", "csv", text.encode("latin-1"))
    err = one_line(run("task", "check", spec, ok=False))
    offset = len(("text,label\n" + "plain,0\n" * 100 + "caf").encode())
    assert "latin.csv (split 'train') is not utf-8 text: byte 0xe9 at offset " + str(offset) in err
    assert "set `encoding:`" in err
    ok = _files_task(tmp_path, "latin2", "csv", text.encode("latin-1"), encoding="latin-1")
    assert run("task", "check", ok).exit_code == 0  # the field the message names fixes it
    yaml_file = tmp_path / "bin.yaml"
    yaml_file.write_bytes(b"name: \xff\xfe\n")
    assert "bin.yaml is not UTF-8 text (byte 0xff at offset 6)" in one_line(run("task", "show", yaml_file, ok=False))


def test_jsonl_rows_of_the_wrong_type(tmp_path):
    spec = _files_task(tmp_path, "rows", "jsonl", b'{"text": "a", "label": "1"}\n[1, 2]\n')
    err = one_line(run("task", "check", spec, ok=False))
    assert "line 2 of" in err and "holds a JSON list, not an object" in err


def test_library_folder_without_prompt_json_is_a_broken_entry(lib_with_entries):
    lib = lib_with_entries
    ghost = lib.root / "ghost"
    (ghost / "sub").mkdir(parents=True)
    (ghost / "sub" / "x.bin").write_bytes(b"x")
    rows = json.loads(run("--library", lib.root, "library", "list", "--json").stdout)["prompts"]
    assert [r["name"] for r in rows] == ["a", "ghost", "b"] or [r["name"] for r in rows] == ["a", "b", "ghost"]
    assert "broken: no prompt.json" in next(r for r in rows if r["name"] == "ghost")["error"]
    assert "ghost" in run("--library", lib.root, "library", "list").stdout
    err = one_line(run("--library", lib.root, "library", "show", "ghost", ok=False))
    assert "prompt 'ghost' is broken" in err and "library rm ghost" in err
    run("--library", lib.root, "library", "rm", "ghost")
    assert not ghost.exists() and sorted(Library(lib.root).names()) == ["a", "b"]
    assert "no prompt 'ghost'" in one_line(run("--library", lib.root, "library", "rm", "ghost", ok=False))


CYCLE = """name: loop
nodes:
  - {name: a, role: target, prompt: pa}
  - {name: b, role: subtask, prompt: pb}
decomposition:
  a: [b]
  b: [a]
"""


def test_compose_link_and_multitask_check_the_graph(tmp_path, in_tmp, monkeypatch):
    g = tmp_path / "loop.yaml"
    g.write_text(CYCLE)
    _no_work(monkeypatch)
    for args in (["compose", g, "--target", "a", "--save", "x"], ["graph", "link", g, "--out", tmp_path / "o.json"],
                 ["train", "--multitask", "--graph", g, "--steps", "1"]):
        err = one_line(run(*args, ok=False))
        assert "cycle in part_of" in err, args
    assert not (tmp_path / "o.json").exists() and list(in_tmp.iterdir()) == []


def test_node_declared_twice_with_different_prompts_is_a_fault(tmp_path):
    g = tmp_path / "twice.yaml"
    g.write_text("name: twice\nnodes:\n  - {name: a, role: source, prompt: p1}\n  - {name: a, role: source, "
                 "prompt: p2}\n  - {name: t, role: target}\nsimilar: []\n")
    r = run("graph", "validate", g, "--no-prompts", ok=False)
    assert r.exit_code == 1 and "node 'a' is declared twice, as task 'a', prompt 'p1' and as task 'a', prompt 'p2'" \
        in r.stderr


def test_backbone_hints_name_the_fix(tmp_path):
    from composer.backbones import load_backbone
    from composer.errors import BackboneError

    with pytest.raises(BackboneError, match=r"not in the local Hugging Face cache.*hf download someorg/uncached"):
        load_backbone("someorg/uncached")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(BackboneError, match="transformers cannot read it"):
        load_backbone(str(odd))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text('{"model_type": "custom-x", "auto_map": {"AutoConfig": "c.XConfig"}}')
    with pytest.raises(BackboneError, match="trust_remote_code is off"):
        load_backbone(str(remote))


# -- resume: a run that could not save, and run files that are not what they should be ------------------
def test_a_run_that_could_not_save_is_saved_by_resume_with_a_new_name(toy_task, tiny_bert_dir, tmp_path, in_tmp,
                                                                      monkeypatch):
    import composer.train as T

    real = T.save_to_library

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "save_to_library", full_disk)
    err = one_line(run("train", toy_task, "--model", tiny_bert_dir, "--save", "first", *TINY, ok=False))
    assert "trained, but could not save 'first' ([Errno 28] No space left on device)" in err
    assert "--resume runs/first --save NAME" in err
    monkeypatch.setattr(T, "save_to_library", real)
    res = json.loads(run("train", "--resume", in_tmp / "runs" / "first", "--save", "second", "--quiet",
                         "--json").stdout)
    assert res["saved"] == "second" and res["steps"] == 2 and Library().names() == ["second"]
    err = one_line(run("train", "--resume", in_tmp / "runs" / "first", "--save", "../x", ok=False))
    assert "bad --save '../x'" in err


def test_a_multitask_run_that_could_not_save_is_saved_by_resume_with_a_new_prefix(toy_task, tiny_bert_dir, tmp_path,
                                                                                  in_tmp, monkeypatch):
    import composer.multitask as M
    from tests.conftest import write_toy_task

    other = write_toy_task(tmp_path, name="toy2", seed=1)
    real = M.save_to_library

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(M, "save_to_library", full_disk)
    base = ["train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir, "--max-eval", "8",
            "--run-dir", in_tmp / "runs" / "mt", *TINY]
    err = one_line(run(*base, "--save-prefix", "a-", ok=False))
    assert "trained, but could not save 'a-toy' ([Errno 28] No space left on device)" in err
    assert "--resume" in err and "--save-prefix PREFIX" in err
    monkeypatch.setattr(M, "save_to_library", real)
    res = json.loads(run("train", "--resume", in_tmp / "runs" / "mt", "--save-prefix", "b-", "--quiet",
                         "--json").stdout)
    assert res["steps"] == 2 and sorted(Library().names()) == ["b-toy", "b-toy2"]


def test_resume_from_broken_run_files_is_one_line(toy_task, tiny_bert_dir, in_tmp):
    run("train", toy_task, "--model", tiny_bert_dir, "--save", "r", *TINY)
    folder = in_tmp / "runs" / "r"
    ckpt = folder / "checkpoint" / "trainable.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:20])
    err = one_line(run("train", "--resume", folder, "--quiet", ok=False))
    assert "trainable.safetensors is truncated or corrupted" in err and str(folder / "checkpoint") in err
    run("train", toy_task, "--model", tiny_bert_dir, "--save", "r2", *TINY)
    other = in_tmp / "runs" / "r2"
    (other / "checkpoint" / "state.json").write_text("{not json")
    err = one_line(run("train", "--resume", other, "--quiet", ok=False))
    assert "state.json is truncated or corrupted (JSONDecodeError" in err and f"remove {other / 'checkpoint'}" in err
    (folder / "config.json").write_text("{not json")
    assert "cannot be read as JSON" in one_line(run("train", "--resume", folder, ok=False))


# -- outputs under a file, hub data offline -------------------------------------------------------------
def _usage_error(r) -> str:
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_an_output_under_a_file_is_refused_before_work(lib_with_entries, toy_task, tiny_bert_dir, tmp_path, in_tmp,
                                                       monkeypatch):
    _no_work(monkeypatch)
    f = tmp_path / "afile"
    f.write_text("mine")
    before = snapshot(lib_with_entries.root)
    name = lib_with_entries.names()[0]
    for args in (["library", "export-peft", name, f / "sub"],
                 ["train", toy_task, "--model", tiny_bert_dir, "--run-dir", f / "run", "--save", "x"],
                 ["train", toy_task, "--model", tiny_bert_dir, "--plot", f / "a" / "curve.png", "--save", "x"],
                 ["graph", "draw", "g.yaml", "--out", f / "g.png"],
                 ["demo", "--out", f / "demo"]):
        err = _usage_error(run(*args, ok=False))
        assert f"{f} is a file, not a folder" in err, (args, err)
    assert f.read_text() == "mine" and snapshot(lib_with_entries.root) == before
    assert list(in_tmp.iterdir()) == []


def test_a_hub_task_offline_says_so(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someorg/nosuch' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    spec = tmp_path / "hubtask.yaml"
    spec.write_text("name: hubtask\ndata:\n  source: hub\n  path: someorg/nosuch\n  splits: {train: train}\n"
                    "inputs: [text]\ntemplate: '{text}'\nlabel_field: label\nlabels: ['0', '1']\nmetric: accuracy\n")
    err = one_line(run("task", "check", spec, ok=False))
    assert "hub dataset 'someorg/nosuch' is not in the local datasets cache" in err and "HF_HUB_OFFLINE=0" in err


def test_a_read_only_library_refuses_rm_and_import_in_one_line(lib_with_entries, tmp_path, monkeypatch):
    import composer.library as L

    lib = lib_with_entries
    adapter = Path(run("--library", lib.root, "library", "export-peft", "a", tmp_path / "exp").stdout.strip())
    before = snapshot(lib.root)
    real = L.os.access  # root reads and writes any folder, so the permission bits cannot show it: os.access is asked
    monkeypatch.setattr(L.os, "access", lambda p, mode, **kw: real(p, mode, **kw) and not (
        Path(p) == lib.root and mode & L.os.W_OK))
    for args in (["library", "rm", "a"], ["library", "import-peft", adapter, "--name", "c"]):
        err = one_line(run("--library", lib.root, *args, ok=False))
        assert f"the library at {lib.root} is not writable" in err, (args, err)
    assert snapshot(lib.root) == before
