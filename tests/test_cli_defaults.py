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
