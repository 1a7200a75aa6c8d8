"""The command line states no default, choice list or help of its own: they are the config fields'.

train, compose and demo generate their options from the fields of TrainConfig / MultiTaskConfig,
ComposeConfig and DemoConfig (composer/config.py); these tests check that every such option is generated
from its field and says what the field says.
"""
from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

import cli
from composer import config as C
from composer.cli import FieldArgument, FieldOption, field_default, field_flag

COMMANDS = {"train": (C.TrainConfig, C.MultiTaskConfig), "compose": (C.ComposeConfig,), "demo": (C.DemoConfig,)}


def _unset(value) -> bool:
    return value is None or type(value).__name__ == "Sentinel"  # click >= 8.2 marks "no default" with a sentinel


def _walk(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_options_named_after_a_field_are_generated_from_it(command):
    """A parameter that carries a config setting is a FieldOption/FieldArgument (nothing restated by hand)."""
    cmd = cli.cli.commands[command]
    fields = set().union(*({f.name for f in dataclasses.fields(c)} for c in COMMANDS[command]))
    from_fields = [p for p in cmd.params if isinstance(p, (FieldOption, FieldArgument))]
    assert len(from_fields) >= 8, f"{command}: only {[p.name for p in from_fields]} generated from fields"
    for p in cmd.params:
        if p.name in fields:
            assert isinstance(p, (FieldOption, FieldArgument)), f"{command} {p.opts[0]} is written by hand"


def _generated():
    for path, cmd in _walk(cli.cli):
        for p in cmd.params:
            if isinstance(p, (FieldOption, FieldArgument)):
                yield " ".join(path), cmd, p


@pytest.mark.parametrize("command,cmd,param", list(_generated()),
                         ids=lambda x: x if isinstance(x, str) else getattr(x, "name", None))
def test_option_says_what_its_field_says(command, cmd, param):
    cls, name = param.source
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    where = f"{command} {param.opts[0]} ({cls.__name__}.{name})"
    assert param.name == name, where  # ctx.params maps straight onto the config
    flag = field_flag(cls, name)
    assert (param.opts[0] if isinstance(param, click.Option) else param.human_readable_name) == flag, where
    want = field_default(cls, name)
    got = param.get_default(click.Context(cmd))
    if want is dataclasses.MISSING:
        assert param.required or (isinstance(param, click.Argument) and name == "task"), where  # TASK or --resume
        assert _unset(got), where
    elif want is None:
        assert _unset(got), where
    else:
        assert (tuple(got) if param.multiple else got) == want, f"{where}: cli says {got!r}, the field {want!r}"
    choices = f.metadata.get("choices")
    if choices:
        assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == choices, where
    else:
        assert not isinstance(param.type, click.Choice), where
    if isinstance(param, click.Option) or getattr(param, "help", None) is not None:
        text = f.metadata["help"]
        assert text[1:] in param.help, f"{where}: help {param.help!r} lacks the field's {text!r}"


def test_train_help_gives_the_multitask_defaults_where_they_differ():
    cmd = cli.cli.commands["train"]
    helps = {p.name: p.help for p in cmd.params if isinstance(p, click.Option)}
    differ = [f.name for f in dataclasses.fields(C.MultiTaskConfig)
              if f.name in helps and f.name in {g.name for g in dataclasses.fields(C.TrainConfig)}
              and field_default(C.MultiTaskConfig, f.name) != field_default(C.TrainConfig, f.name)]
    assert {"steps", "batch_size", "eval_every", "max_eval", "backbone"} <= set(differ)
    for name in differ:
        value = field_default(C.MultiTaskConfig, name)
        note = "the graph's, else minilm" if value is None else str(value)
        assert f"(--multitask default: {note})" in helps[name], (name, helps[name])
    for name in ("steps", "lr", "seed"):  # a default the two share is not repeated
        if name not in differ:
            assert "--multitask default" not in helps[name], name


def test_multitask_takes_its_own_defaults_for_options_not_given(monkeypatch, tmp_path):
    """`train --multitask` passes on only the options given; the rest are MultiTaskConfig's (not single-task's)."""
    import composer.multitask as mt

    seen = {}

    def fake(cfg, **kw):
        seen["cfg"] = cfg
        return {"per_task": {}}

    monkeypatch.setattr(mt, "train_multitask", fake)
    r = CliRunner().invoke(cli.cli, ["--library", str(tmp_path), "train", "--multitask", "--tasks", "a,b",
                                     "--lr", "0.1", "--seed", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got, want = seen["cfg"], C.MultiTaskConfig(tasks="a,b")
    assert (got.lr, got.seed, got.tasks) == (0.1, 3, want.tasks)
    for name in ("steps", "batch_size", "eval_every", "max_eval", "sampling_temperature", "backbone", "composer"):
        assert getattr(got, name) == getattr(want, name), name


def test_single_task_takes_every_default_from_train_config(monkeypatch):
    import composer.train as T

    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg, **kw: seen.update(cfg=cfg) or {})
    r = CliRunner().invoke(cli.cli, ["train", "sst2", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == C.TrainConfig(task="sst2")


def test_compose_and_demo_take_their_configs_defaults(monkeypatch):
    import composer.compose as CO
    import composer.demo as D

    seen = {}
    monkeypatch.setattr(CO, "compose", lambda cfg, **kw: seen.update(compose=cfg) or {})
    monkeypatch.setattr(D, "run_demo", lambda cfg, **kw: seen.update(demo=cfg) or {})
    r = CliRunner().invoke(cli.cli, ["compose", "g.yaml", "--target", "t", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen["compose"] == C.ComposeConfig(graph="g.yaml", target="t")
    r = CliRunner().invoke(cli.cli, ["demo", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen["demo"] == C.DemoConfig()
    r = CliRunner().invoke(cli.cli, ["demo", "--target", "topic-polarity", "--model", "m", "--json"],
                           catch_exceptions=False)
    assert (seen["demo"].targets, seen["demo"].backbone) == (("topic-polarity",), "m")
