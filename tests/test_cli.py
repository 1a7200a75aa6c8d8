"""The command line through CliRunner: JSON parsed, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
               "--run-dir", tmp_path / "run2", "--plot", tmp_path / "curve.png", "--quiet").stdout
    assert "dev accuracy: before" in text and "->" in text
    assert f"learning curve: {tmp_path / 'curve.png'}" in text and (tmp_path / "curve.png").stat().st_size > 0
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
               "--run-dir", tmp_path / "mt", "--plot", tmp_path / "mt.png", "--quiet")
    assert set(res["per_task"]) == {"toy", "toy2"}
    assert res["plot"] == str(tmp_path / "mt.png") and (tmp_path / "mt.png").stat().st_size > 0
    assert sorted(p["name"] for p in jrun("library", "list")["prompts"]) == ["mt-toy", "mt-toy2"]
    bad = run("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir, "--temperature", 0,
              ok=False)
    assert "temperature" in one_line_error(bad)


def test_multitask_shared_mixture_from_cli(toy_task, tiny_bert_dir, tmp_path):
    """--shared mixture names the one prompt it saved, and that entry is an init like any other."""
    from tests.conftest import write_toy_task

    other = write_toy_task(tmp_path, name="toy2", seed=1)
    out = run("train", "--multitask", "--tasks", f"{toy_task},{other}", "--model", tiny_bert_dir, "--steps", 2,
              "--eval-every", 1, "--prompt-length", 4, "--batch-size", 8, "--shared", "mixture",
              "--save-prefix", "mix-", "--run-dir", tmp_path / "mix", "--quiet").output
    assert "shared prompt saved as mix-shared (step " in out
    names = sorted(p["name"] for p in jrun("library", "list")["prompts"])
    assert names == ["mix-shared", "mix-toy", "mix-toy2"]
    jrun("train", toy_task, "--model", tiny_bert_dir, "--init", "library:mix-shared", "--steps", 1,
         "--prompt-length", 4, "--run-dir", tmp_path / "one", "--save", "from-mix", "--quiet")
    prov = Library().load("from-mix").meta["provenance"]
    assert (prov["init"], prov["from"]) == ("library", "mix-shared"), prov


@pytest.mark.parametrize("args,msg", [
    (["train", "sst2", "--temperature", "2"], "--temperature applies to --multitask runs only; the label-similarity"),
    (["train", "sst2", "--save-prefix", "x-"], "--save-prefix applies to --multitask runs only"),
    (["train", "--multitask", "--tasks", "a,b", "--save", "x"], "--save does not apply to a multitask run (each"),
    (["train", "sst2", "--multitask", "--tasks", "a,b"], "TASK does not apply to a multitask run"),
])
def test_options_that_do_not_apply_are_refused(args, msg):
    """An option the run would not read is a usage error, not silently dropped."""
    r = run(*args, ok=False)
    assert r.exit_code == 2 and msg in r.output


def test_resume_alone_goes_on_with_the_runs_own_settings(tmp_path, monkeypatch):
    """`train --resume DIR` reads DIR/config.json: a multitask run resumes as one; extra options are refused."""
    import composer.multitask as M
    import composer.train as T

    seen = {}
    monkeypatch.setattr(M, "train_multitask", lambda cfg, **kw: seen.update(multi=cfg, **kw) or {"per_task": {}})
    monkeypatch.setattr(T, "train", lambda cfg, **kw: seen.update(single=cfg, **kw) or {})
    mt = tmp_path / "mt"
    mt.mkdir()
    mcfg = M.MultiTaskConfig(tasks="a,b", steps=7, sampling_temperature=2.0, run_dir=str(mt))
    (mt / "config.json").write_text(json.dumps(mcfg.to_dict()))
    run("train", "--resume", mt, "--json")
    assert seen["multi"] == mcfg and seen["resume"] == str(mt)
    one = tmp_path / "one"
    one.mkdir()
    old = {k: v for k, v in T.TrainConfig(task="sst2", steps=5).to_dict().items() if k != "label_temperature"}
    (one / "config.json").write_text(json.dumps(old | {"temperature": 0.1}))  # as older versions wrote it
    run("train", "--resume", one, "--json")
    assert seen["single"].label_temperature == 0.1 and seen["single"].steps == 5
    r = run("train", "--resume", one, "--steps", "9", ok=False)
    assert r.exit_code == 2 and "drop --steps" in r.output


def test_train_options_reach_the_config(monkeypatch):
    import composer.train as T

    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg, **kw: seen.update(cfg=cfg) or {})
    run("train", "sst2", "--label-temperature", "0.2", "--gradient-checkpointing", "--patience", "3", "--k-shot",
        "16", "--save", "s", "--json")
    c = seen["cfg"]
    assert (c.task, c.label_temperature, c.gradient_checkpointing, c.patience, c.k_shot, c.save) == \
        ("sst2", 0.2, True, 3, 16, "s")
    assert c.steps == T.TrainConfig(task="x").steps  # not given: the config's default


def test_eval_runs_where_device_says(toy_task, tiny_bert_dir):
    Library().save("p32", torch.zeros(4, 32), {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder"})
    r = jrun("eval", "p32", "--task", toy_task, "--model", tiny_bert_dir, "--device", "cpu")
    assert r["n"] > 0 and 0 <= r["score"] <= 1
    err = one_line_error(run("eval", "p32", "--task", toy_task, "--model", tiny_bert_dir, "--device", "tpu", ok=False))
    assert "bad --device 'tpu': use auto, cpu, cuda or cuda:N" in err


ROOT = Path(__file__).resolve().parents[1]


def _python(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)


def test_entry_points_are_one_app():
    """The root cli.py (checkout, torchrun -m cli) re-exports the package's app; the script runs composer.cli."""
    import cli as root_cli
    import composer.cli

    assert root_cli.cli is composer.cli.cli and root_cli.main is composer.cli.main
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["prompt-composer"] == "composer.cli:main"
    assert "py-modules" not in meta["tool"]["setuptools"]  # no top-level `cli` in site-packages


@pytest.mark.parametrize("entry", [["-m", "composer"], ["cli.py"], ["-m", "cli"]])
def test_entry_points_run(entry):
    r = _python(*entry, "train", "--help")
    assert r.returncode == 0, r.stderr
    assert "--prompt-lr" in r.stdout and "--multitask default: 1000" in r.stdout


def test_help_does_not_import_torch():
    """--help is fast: the config module is stdlib-only and the commands import the library lazily."""
    code = ("import sys\nfrom composer.cli import cli\n"
            "for args in (['--help'], ['train', '--help'], ['compose', '--help'], ['demo', '--help'], "
            "['graph', 'validate', '--help']):\n"
            "    try:\n        cli(args)\n    except SystemExit as e:\n        assert e.code == 0, args\n"
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'datasets') if m in sys.modules))")
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
