"""The command line and the config dataclasses state the same defaults.

Each command keeps its own click defaults (so ``--help`` shows them without importing torch) and the
library keeps them in its config dataclass; these tests fail when the two drift apart.
"""
from __future__ import annotations

import dataclasses

import click
import pytest

import cli


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _pairs():
    from composer.compose import ComposeConfig
    from composer.demo import DemoConfig
    from composer.train import TrainConfig

    return [("train", TrainConfig), ("compose", ComposeConfig), ("demo", DemoConfig)]


@pytest.mark.parametrize("command,config", _pairs(), ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_cli_defaults_match_config(command, config):
    cmd = cli.cli.commands[command]
    fields = _field_defaults(config)
    ctx = click.Context(cmd)
    checked = []
    for p in cmd.params:
        if p.name not in fields:
            continue
        want = fields[p.name]
        got = p.get_default(ctx)
        if got is None or type(got).__name__ == "Sentinel":  # not given: the config's own default applies
            continue
        if isinstance(want, tuple):  # click's multiple=True gives () for none given: the config fills it in
            continue
        assert got == want, f"{command} --{p.name.replace('_', '-')}: cli says {got!r}, {config.__name__} says {want!r}"
        checked.append(p.name)
    assert len(checked) >= 4, f"{command}: only {checked} compared; has the parameter naming changed?"


def test_multitask_takes_its_own_defaults_for_options_not_given(monkeypatch, tmp_path):
    """`train --multitask` passes on only the options given; the rest are MultiTaskConfig's (not single-task's)."""
    import composer.multitask as mt
    from click.testing import CliRunner

    seen = {}

    def fake(cfg, **kw):
        seen["cfg"] = cfg
        return {"per_task": {}}

    monkeypatch.setattr(mt, "train_multitask", fake)
    r = CliRunner().invoke(cli.cli, ["--library", str(tmp_path), "train", "--multitask", "--tasks", "a,b",
                                     "--lr", "0.1", "--seed", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, want = seen["cfg"], mt.MultiTaskConfig(tasks="a,b")
    assert (got.lr, got.seed, got.tasks) == (0.1, 3, want.tasks)
    for name in ("steps", "batch_size", "eval_every", "max_eval", "temperature", "model", "composer"):
        assert getattr(got, name) == getattr(want, name), name
