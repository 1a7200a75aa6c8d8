"""The command line through CliRunner: JSON parsed, exit codes, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from composer.library import Library


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def jrun(*args):
    return json.loads(run(*args, "--json").stdout)


def test_task_list_and_show():
    rows = jrun("task", "list")
    names = {r["name"] for r in rows}
    assert {"sst2", "rte", "cb", "mrpc"} <= names
    sst2 = jrun("task", "show", "sst2")
    assert sst2["metric"] == "accuracy" and sst2["labels"] == ["0", "1"]
    assert "sst2" in run("task", "list").stdout


def test_train_eval_library_round_trip(toy_task, tiny_bert_dir, tmp_path):
    res = jrun("train", toy_task, "--model", tiny_bert_dir, "--steps", 6, "--eval-every", 3, "--prompt-length", 4,
               "--batch-size", 8, "--save", "toy-tiny", "--run-dir", tmp_path / "run", "--quiet")
    assert res["steps"] == 6 and res["saved"] == "toy-tiny" and res["initial"]["n"] == 60
    assert 0 <= res["dev"]["score"] <= 1
    ev = jrun("eval", "toy-tiny", "--task", toy_task)
    assert ev["score"] == pytest.approx(res["dev"]["score"]) and ev["split"] == "dev" and ev["n"] == 60
    lst = jrun("library", "list")
    assert [p["name"] for p in lst["prompts"]] == ["toy-tiny"] and lst["prompts"][0]["length"] == 4
    show = jrun("library", "show", "toy-tiny")
    assert show["stats"]["shape"] == [4, 32] and show["task"] == "toy"
    text = run("train", toy_task, "--model", tiny_bert_dir, "--steps", 2, "--eval-every", 2, "--prompt-length", 4,
               "--run-dir", tmp_path / "run2", "--quiet").stdout
    assert "dev accuracy: before" in text and "->" in text
    run("library", "rm", "toy-tiny")
    assert jrun("library", "list")["prompts"] == []


def test_resume_from_cli(toy_task, tiny_bert_dir, tmp_path):
    args = ["train", toy_task, "--model", tiny_bert_dir, "--steps", 4, "--eval-every", 2, "--prompt-length", 4,
            "--run-dir", tmp_path / "run", "--quiet"]
    run(*args)
    res = jrun("train", "--resume", tmp_path / "run", "--quiet")
    assert res["steps"] == 4


def one_line_error(r, code=1):
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("args,msg", [
    (["train", "no-such-task"], "unknown task 'no-such-task'"),
    (["train", "sst2", "--model", "no-such-model"], "unknown backbone 'no-such-model'"),
    (["train", "sst2", "--steps", "0"], "--steps must be positive, got 0"),
    (["train", "sst2", "--lr", "-0.1"], "prompt learning rate must be > 0"),
    (["eval", "../etc"], "bad prompt name '../etc'"),
    (["eval", "missing"], "no prompt 'missing' in the library"),
    (["library", "show", "a/b"], "bad prompt name 'a/b'"),
    (["task", "show", "nope"], "unknown task 'nope'"),
])
def test_bad_input_is_one_line(args, msg):
    err = one_line_error(run(*args, ok=False))
    assert msg in err


def test_usage_errors_exit_2():
    assert run("train", "--steps", "x", ok=False).exit_code == 2
    assert run("frobnicate", ok=False).exit_code == 2
    assert run("train", ok=False).exit_code == 2


def test_debug_shows_traceback():
    r = CliRunner().invoke(cli, ["--debug", "task", "show", "nope"])
    assert r.exit_code == 1 and r.exception is not None  # re-raised, not turned into one line


def test_prompt_into_wrong_hidden_size(toy_task, tiny_bert_dir):
    Library().save("wide", torch.zeros(4, 48), {"task": "toy", "backbone": "x", "family": "encoder"})
    err = one_line_error(run("eval", "wide", "--task", toy_task, "--model", tiny_bert_dir, ok=False))
    assert "hidden size 48" in err and "has hidden size 32" in err


def test_multitask_from_cli(toy_task, tiny_bert_dir, tmp_path):
    from tests.conftest import write_toy_task

    other = write_toy_task(tmp_path, name="toy2", seed=1)
    res = jrun("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir, "--steps", 4,
               "--eval-every", 2, "--prompt-length", 4, "--batch-size", 8, "--temperature", 2, "--save-prefix", "mt-",
               "--run-dir", tmp_path / "mt", "--quiet")
    assert set(res["per_task"]) == {"toy", "toy2"}
    assert sorted(p["name"] for p in jrun("library", "list")["prompts"]) == ["mt-toy", "mt-toy2"]
    bad = run("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir, "--temperature", 0,
              ok=False)
    assert "temperature" in one_line_error(bad)
