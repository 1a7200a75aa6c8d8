"""The README's walk-through, run as a newcomer runs it: every command block, in order, in a fresh folder.

The commands are read from README.md (between "## Walk-through" and the next "## " heading) and run as
written, through the CLI, in a new folder holding the checkout's graphs/ and ../shared/data, with an empty
library. Only the budget is cut: the options in BUDGET are appended (click keeps the last value given), so
that `--steps 300` trains 2 steps here. A README edit that breaks the flow breaks this test.

The default run takes the commands on the packaged minilm and the built-in tasks (the flow the README
teaches); `-m slow` runs all of them (smollm2, the real-data and generation commands too).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from composer.cli import cli
from tests.conftest import ROOT, SHARED_DATA

README = ROOT / "README.md"

# Appended to a command, by its subcommand: what makes the walk-through run in seconds.
BUDGET = {
    "train": ["--steps", "2", "--eval-every", "2", "--max-eval", "16", "--max-test", "16"],
    "train --multitask": ["--steps", "2", "--eval-every", "2", "--max-eval", "16", "--max-test", "16"],
    "eval": ["--max-examples", "8"],
    "graph link": ["--max-examples", "16"],
    "generate": ["--max-new-tokens", "8"],
}


def walkthrough_commands(text: str) -> list[list[str]]:
    """Each command line of the walk-through's code blocks, split as a shell splits it (comments dropped)."""
    section = text.split("## Walk-through", 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.S | re.M):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _subcommand(argv: list[str]) -> str:
    if argv[1] == "train" and "--multitask" in argv:
        return "train --multitask"
    return " ".join(argv[1:3]) if argv[1] in {"graph", "library", "task"} else argv[1]


def _heavy(argv: list[str]) -> bool:
    """A command left to the slow run: a second backbone, or work on real data (checking it is quick)."""
    return "smollm2-135m" in argv or ("--data-dir" in argv and argv[1:3] != ["task", "check"])


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_walkthrough_is_commands():
    """Every line of the walk-through's code blocks is a prompt-composer command (what this test can run)."""
    commands = walkthrough_commands(README.read_text())
    assert len(commands) >= 15
    assert {c[0] for c in commands} == {"prompt-composer"}, [c for c in commands if c[0] != "prompt-composer"]
    assert [c for c in commands if c[1] == "train"], "the walk-through trains something"


def run_walkthrough(tmp_path: Path, monkeypatch, everything: bool) -> list[str]:
    """Runs the commands in order; returns what ran (`skipped: ...` for those left to the other run)."""
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "graphs").symlink_to(ROOT / "graphs", target_is_directory=True)
    if SHARED_DATA.is_dir():
        (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("PROMPT_COMPOSER_LIBRARY", str(tmp_path / "library"))
    monkeypatch.delenv("PROMPT_COMPOSER_DATA", raising=False)

    runner = CliRunner()
    ran, skipped_names, saved = [], set(), []
    for argv in walkthrough_commands(README.read_text()):
        line = shlex.join(argv)
        needs_data = "--data-dir" in argv and not SHARED_DATA.is_dir()
        depends = any(a in skipped_names for a in argv[2:])
        if needs_data or depends or (not everything and _heavy(argv)):
            skipped_names.update(v for v in [_value(argv, "--save")] if v)
            ran.append(f"skipped: {line}")
            continue
        args = argv[1:] + BUDGET.get(_subcommand(argv), [])
        result = runner.invoke(cli, args, obj={})
        detail = f"$ {line}\n{result.output}"
        if result.exception and not isinstance(result.exception, SystemExit):
            import traceback

            detail += "".join(traceback.format_exception(result.exception))
        assert result.exit_code == 0, detail
        check_output(argv, result.stdout, saved, detail)
        if _value(argv, "--save"):
            saved.append(_value(argv, "--save"))
        ran.append(line)
    return ran


def check_output(argv: list[str], stdout: str, saved: list[str], detail: str) -> None:
    """The documented shape of each command's output."""
    if "--json" in argv:
        json.loads(stdout)  # one JSON document
    sub = _subcommand(argv)
    if sub == "library list":
        for name in saved:
            assert name in stdout, detail
    elif sub == "graph validate":
        assert stdout.strip(), detail
    elif sub == "task list":
        assert "negated-polarity" in stdout, detail
    for flag in ("--out", "--predictions"):
        if _value(argv, flag):
            assert Path(_value(argv, flag)).exists(), detail
    if sub == "library export-peft":
        assert (Path(argv[4]) / "adapter_config.json").is_file(), detail
    if sub == "generate":
        assert stdout.strip(), detail


def test_readme_walkthrough(tmp_path, monkeypatch):
    """The walk-through on minilm and the built-in tasks, top to bottom, exit 0 at every step."""
    ran = run_walkthrough(tmp_path, monkeypatch, everything=False)
    done = [r for r in ran if not r.startswith("skipped")]
    assert any(r.startswith("prompt-composer compose") for r in done), ran
    assert any(r.startswith("prompt-composer library export-peft") for r in done), ran


@pytest.mark.slow
def test_readme_walkthrough_everything(tmp_path, monkeypatch):
    """All of it: smollm2, the real-data task, the generation commands."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    ran = run_walkthrough(tmp_path, monkeypatch, everything=True)
    assert not [r for r in ran if r.startswith("skipped")], ran
