"""bench/dialogue.py end to end on a tiny decoder: module prompts, every arm, the report; then from the records."""
import json

import pytest

from .test_bench_transfer import _bench_module
from .test_generation import write_copy_task


@pytest.fixture(scope="module")
def dialogue_mod():
    _bench_module("transfer", "transfer.py")  # dialogue.py imports its sibling by name
    return _bench_module("bench_dialogue", "dialogue.py")


ALL = ["random", "vocab", "peft", "best", "average", "linear", "attention", "concat", "full", "joint"]


@pytest.mark.parametrize("arms", [pytest.param(["random", "peft", "best", "attention", "joint"], id="some"),
                                  pytest.param(ALL, id="all", marks=pytest.mark.slow)])
def test_dialogue_bench_runs_its_arms_and_reads_its_records_back(dialogue_mod, tiny_llama_dir, tmp_path,
                                                                 monkeypatch, capsys, arms):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMPT_COMPOSER_DATA", str(tmp_path / "data"))
    for name in ("say", "echo", "reply"):  # two modules and the target: the same toy copy task under three names
        write_copy_task(tmp_path, name=name)
    (tmp_path / "graph.yaml").write_text("name: toy-dialogue\nnodes:\n  - {name: reply, role: target}\n"
                                         "  - {name: say, role: subtask}\n  - {name: echo, role: subtask}\n"
                                         "decomposition:\n  reply: [say, echo]\n")
    out = tmp_path / "out"
    argv = ["--target", "reply", "--graph", str(tmp_path / "graph.yaml"), "--model", str(tiny_llama_dir),
            "--arms", ",".join(arms), "--seeds", "0",
            "--module-steps", "3", "--steps", "2", "--eval-every", "2", "--module-max-eval", "4", "--max-eval", "4",
            "--max-test", "4", "--shots", "2", "--k-shot", "8", "--batch-size", "4", "--prompt-length", "2",
            "--lr", "0.1", "--library", str(tmp_path / "lib"), "--runs", str(out), "--data-dir",
            str(tmp_path / "data"), "--out-md", str(tmp_path / "report.md")]
    dialogue_mod.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert res["result"]["subtasks"] == ["say", "echo"] and set(res["result"]["modules"]) == {"say", "echo"}
    assert set(res["summary"]) == set(arms), res["result"]["skipped"]
    for arm, a in res["summary"].items():
        assert set(a["test"]) == {"exact_match", "token_f1"} and len(a["examples"]) == 3, arm
        assert {"prediction", "references"} <= set(a["examples"][0])
    peft_run = res["result"]["runs"]["peft"][0]
    assert peft_run["init"].startswith("random (PEFT") and peft_run["steps"] == 2
    assert res["result"]["runs"]["best"][0]["candidates"] == ["say", "echo"]
    md = (tmp_path / "report.md").read_text()
    assert "| arm | test exact_match | test token_f1 |" in md and "| joint (from " in md and "reference:" in md

    capsys.readouterr()
    dialogue_mod.main(argv)  # again: every run is read back from its record
    again = json.loads((out / "results.json").read_text())
    assert again["reused_runs"] >= len(arms) and again["summary"] == res["summary"]
