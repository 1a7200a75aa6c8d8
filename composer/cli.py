"""prompt-composer's command line: parse, build a config, call one library function, print.

Data goes to stdout (one JSON document with --json); progress and logs go to stderr.
Exit codes: 0 done, 1 failed (one line: what, the value, the fix), 2 bad invocation.

The options of train, compose and demo are generated from the fields of their config dataclasses
(composer/config.py: default, choices, help, flag name) by :func:`option_from`, so a setting is stated
once. Entry points: the console script ``prompt-composer``, ``python -m composer``, and, from a
checkout, the root cli.py (``torchrun ... -m cli``).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import sys
import types
import typing
from pathlib import Path

import click

from composer.config import (
    DEVICE_HELP,
    HEADS,
    LINK_METRICS,
    SIMILARITY_METRICS,
    SPLITS,
    ComposeConfig,
    DemoConfig,
    MultiTaskConfig,
    TrainConfig,
)
from composer.errors import ComposerError

# Command bodies import the library lazily (heavy: torch/transformers), so that --help stays fast.

# offline by default: nothing is fetched from a hub unless a command is told it may
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by huggingface_hub and transformers on import

log = logging.getLogger("prompt_composer")


# ------------------------------------------------------------------------------ options from fields
class FieldOption(click.Option):
    """A click option generated from a config field; ``source`` is (the dataclass, the field's name)."""

    def __init__(self, *args, source: tuple[type, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


class FieldArgument(click.Argument):
    """A positional argument generated from a config field (its metadata flag is the metavar: TASK, GRAPH)."""

    def __init__(self, *args, source: tuple[type, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


class OutPath(click.Path):
    """A path a command writes to: refused at once, in one line, where a part above it is a file (the OS would
    say "Not a directory" or "File exists" only when the write comes, after the work)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        for above in Path(os.fspath(value)).absolute().parents:
            if above.exists():
                if not above.is_dir():
                    self.fail(f"{value!r} cannot be written: {above} is a file, not a folder", param, ctx)
                break
        return value


def config_field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def field_default(cls, name: str):
    """The field's default (a factory's value), or dataclasses.MISSING."""
    f = config_field(cls, name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def field_flag(cls, name: str) -> str:
    return config_field(cls, name).metadata.get("flag") or "--" + name.replace("_", "-")


def field_help(cls, name: str) -> str:
    return config_field(cls, name).metadata.get("help", "")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _value_type(cls, name: str):
    """int, float, str, bool, list or tuple (``X | None`` taken as X) and the element type of a list/tuple."""
    hint = _hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    return origin, (args[0] if args else str)


_ARGUMENT_HELP = "help" in inspect.signature(click.Argument.__init__).parameters  # click >= 8.5


def option_from(cls, name: str, *aliases: str, **overrides):
    """A click option (or, for a TASK/GRAPH flag, an argument) whose default, choices and help are the field's.

    The option's name is the field's, so ``ctx.params`` maps straight onto the config; ``aliases`` are extra
    flag names (``--prompt-lr``), ``overrides`` any click setting (``type=click.Path(...)``, ``envvar``,
    ``help``). A bool field is a flag, a tuple field an option given many times, a list field one
    comma-separated string (the config splits it).
    """
    f = config_field(cls, name)
    flag = field_flag(cls, name)
    default = field_default(cls, name)
    kind, element = _value_type(cls, name)
    choices = f.metadata.get("choices")
    value_type = click.Choice(choices) if choices else (element if kind in (list, tuple) else kind)
    if not flag.startswith("-"):  # positional
        kw = {"metavar": flag, "type": value_type, "required": default is dataclasses.MISSING,
              "help": field_help(cls, name)} | overrides
        if default not in (dataclasses.MISSING, None):
            kw["default"] = default
        if not _ARGUMENT_HELP:
            kw.pop("help")  # the command's docstring says what it is
        return click.argument(name, cls=FieldArgument, source=(cls, name), **kw)
    kw: dict = {"help": field_help(cls, name)}
    if default is dataclasses.MISSING:
        kw["required"] = True
    elif kind is bool:
        kw.update(is_flag=True, default=default)
    else:
        kw["type"] = value_type
        if kind is tuple:
            kw["multiple"] = True
        if default is not None:
            kw.update(default=default, show_default=True)
    return click.option(flag, *aliases, name, cls=FieldOption, source=(cls, name), **(kw | overrides))


def _default_text(cls, name: str) -> str:
    """How the help says a default: its value, or the help's own "(default: ...)" when the field has None."""
    value = field_default(cls, name)
    if value is None:
        m = re.search(r"\(default: (.*)\)", field_help(cls, name))
        return m.group(1) if m else "none"
    return str(value)


def train_option(name: str, *aliases: str, **overrides):
    """A train option: TrainConfig's field, or MultiTaskConfig's for the settings only multitask runs have.

    A multitask run takes MultiTaskConfig's defaults for what the user did not give (see :func:`train`);
    where that default differs, the help says so."""
    if name not in field_names(TrainConfig):
        text = field_help(MultiTaskConfig, name)
        return option_from(MultiTaskConfig, name, *aliases, help=f"--multitask: {text[:1].lower()}{text[1:]}",
                           **overrides)
    text = field_help(TrainConfig, name)
    if name in field_names(MultiTaskConfig) and field_default(MultiTaskConfig, name) != field_default(TrainConfig,
                                                                                                        name):
        text += f" (--multitask default: {_default_text(MultiTaskConfig, name)})"
    return option_from(TrainConfig, name, *aliases, help=text, **overrides)


def data_dir_option(cls):
    return option_from(cls, "data_dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")


def device_option(what: str):
    """--device; its default is the config's (ComposeConfig holds it), the help says which commands use it."""
    return option_from(ComposeConfig, "device", help=f"{what}{DEVICE_HELP}")


def _choice_help(choices) -> str:
    return " | ".join(choices)


# ------------------------------------------------------------------------------------------ the app
class App(click.Group):
    """Turns library errors into one line (exit 1); --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ComposerError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit,
                KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # the last resort: no path leaks a traceback unless --debug asks for one
            if ctx.obj and ctx.obj.get("debug"):
                raise
            log.debug("unexpected error", exc_info=True)
            msg = (str(e).strip().splitlines() or [""])[0]
            raise click.ClickException(f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
                                       if msg else f"{type(e).__name__} (run with --debug for the traceback)") from None


def _emit(obj, as_json: bool, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text if text is not None else str(obj))


def _library(ctx):
    from composer.library import Library

    return Library(ctx.obj.get("library"))


def _table(rows: list[list], header: list[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _flags(ctx) -> dict[str, str]:
    """{parameter name: how the user writes it} (--model for backbone, TASK for task)."""
    return {p.name: p.opts[0] if isinstance(p, click.Option) else p.human_readable_name for p in ctx.command.params}


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--library", type=OutPath(file_okay=False), envvar="PROMPT_COMPOSER_LIBRARY",
              help="Prompt library folder (default $PROMPT_COMPOSER_LIBRARY, else ~/.local/share/prompt-composer/library).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
@click.version_option(package_name="prompt-composer")
@click.pass_context
def cli(ctx, library, debug, verbose):
    """Build a task's soft prompt out of the prompts of related tasks.

    \b
    Examples:
      prompt-composer task list
      prompt-composer train polarity --model minilm --steps 300 --save polarity-minilm
      prompt-composer eval polarity-minilm --task polarity --json
      prompt-composer library list
    """
    ctx.ensure_object(dict)
    ctx.obj.update(library=library, debug=debug)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if "transformers" in sys.modules:  # imported before the environment said so (e.g. under tests)
        try:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        except Exception:  # cosmetic only
            log.debug("could not turn off transformers' progress bars", exc_info=True)


# ---------------------------------------------------------------------------------------------- task
@cli.group()
def task():
    """List, show and check task specs (./tasks, then the packaged catalogue)."""


@task.command("list")
@click.option("--json", "as_json", is_flag=True)
def task_list(as_json):
    """List the task specs."""
    from composer.tasks import list_tasks, load_task

    rows = []
    for name in list_tasks():
        try:
            s = load_task(name)
            rows.append({"name": name, "source": s.data.get("source"), "labels": len(s.labels),
                         "metric": s.metric, "description": s.description})
        except ComposerError as e:
            rows.append({"name": name, "error": str(e)})
    _emit(rows, as_json, _table([[r["name"], r.get("source", "!"), r.get("labels", ""), r.get("metric", ""),
                                  r.get("description", r.get("error", ""))] for r in rows],
                                ["task", "source", "labels", "metric", "description"]))


@task.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def task_show(name, as_json):
    """Show a task spec."""
    import yaml

    from composer.tasks import load_task

    spec = load_task(name)
    d = spec.to_dict() if hasattr(spec, "to_dict") else vars(spec)
    _emit(d, as_json, yaml.safe_dump(d, sort_keys=False, allow_unicode=True).rstrip())


@task.command("check")
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False), help=field_help(TrainConfig, "data_dir"))
@click.option("--json", "as_json", is_flag=True)
def task_check(name, data_dir, as_json):
    """Load every split of a task and count rows and labels."""
    import yaml

    from composer.taskdata import check_task
    from composer.tasks import load_task

    summary = check_task(load_task(name), data_dir)
    if as_json:
        _emit(summary, True)
        return
    click.echo(yaml.safe_dump(summary, sort_keys=False).rstrip())


# --------------------------------------------------------------------------------------------- train
@cli.command()
@train_option("task", required=False)
@train_option("backbone")
@train_option("head")
@train_option("kind")
@train_option("prompt_length")
@train_option("prompt_position")
@train_option("prefix_projection")
@train_option("init")
@train_option("mode")
@train_option("unfreeze")
@train_option("adapter")
@train_option("lora_r")
@train_option("lora_alpha")
@train_option("lora_dropout")
@train_option("lora_targets")
@train_option("lora_lr")
@train_option("steps")
@train_option("batch_size")
@train_option("lr", "--prompt-lr")
@train_option("model_lr")
@train_option("schedule")
@train_option("warmup")
@train_option("eval_every")
@train_option("max_eval")
@train_option("max_test")
@train_option("patience")
@train_option("k_shot")
@train_option("seed")
@train_option("label_temperature")
@train_option("sampling_temperature")
@train_option("mixed_precision")
@train_option("gradient_checkpointing")
@train_option("data_dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")
@train_option("save")
@train_option("run_dir", type=OutPath(file_okay=False))
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--multitask", is_flag=True, help="Train many tasks at once (--graph or --tasks), mixed batches.")
@train_option("graph")
@train_option("tasks")
@train_option("composer")
@train_option("shared")
@train_option("distill_kl")
@train_option("distill_hidden")
@train_option("save_prefix")
@click.option("--plot", type=OutPath(dir_okay=False), help="Write the dev learning curve(s) as a PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def train(ctx, resume, multitask, plot, quiet, as_json, **settings):
    """Tune a soft prompt (and, with --mode joint, the backbone) on TASK.

    \b
    Examples:
      prompt-composer train polarity --model minilm --prompt-length 20 --steps 300 --save polarity-minilm
      prompt-composer train sst2 --model smollm2-135m --data-dir ../shared/data --steps 50 --save sst2-smol
      prompt-composer train rte --init library:rte-composed --mode joint --unfreeze last:2 --save rte-joint
      prompt-composer train rte --init library:rte-composed --mode joint --adapter lora --lora-r 8 --save rte-lora
      prompt-composer train polarity --resume runs/polarity-minilm
      prompt-composer train --graph graphs/demo.yaml --multitask --temperature 2 --steps 2000 --save-prefix mt-
      prompt-composer train --graph demo --multitask --shared mpt --save-prefix mpt-   (then --init library:mpt-shared)
    """
    # settings: every option named after a config field (TrainConfig's, and MultiTaskConfig's own)
    flag = _flags(ctx)

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    resumed = None
    if resume and not (settings["task"] or settings["graph"] or settings["tasks"]):
        cfg_file = Path(resume) / "config.json"
        if not cfg_file.exists():
            raise click.ClickException(f"--resume {resume}: no config.json there; is it a run folder?")
        try:
            resumed = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise click.ClickException(f"--resume {resume}: {cfg_file} cannot be read as JSON "
                                       f"({str(e).splitlines()[0]}); it is not a run's config.json") from None
        if not isinstance(resumed, dict):
            raise click.ClickException(f"--resume {resume}: {cfg_file} holds {type(resumed).__name__}, not a "
                                       "run's settings")
        # a run that trained but could not save is saved under a new name: --resume RUN --save NAME
        renames = {k for k in ("save", "save_prefix") if ctx.get_parameter_source(k) is
                   click.core.ParameterSource.COMMANDLINE}
        extra = [flag[k] for k in settings if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE
                 and k not in renames]
        if extra:
            raise click.UsageError(f"--resume {resume} goes on with the run's own settings (its config.json); "
                                   f"drop {', '.join(extra)}")
        multitask = multitask or "tasks" in resumed
    if multitask or settings["graph"] or settings["tasks"]:
        from composer.multitask import train_multitask

        if resumed is None and not (settings["graph"] or settings["tasks"]):
            raise click.UsageError("--multitask needs --graph GRAPH or --tasks a,b,...")
        stray = [flag[k] for k in settings if given(k) and k not in field_names(MultiTaskConfig)]
        if stray:
            hint = " (each task's prompt is saved with --save-prefix PREFIX)" if "--save" in stray else ""
            raise click.UsageError(f"{', '.join(stray)} does not apply to a multitask run{hint}")
        if resumed is not None:
            mcfg = MultiTaskConfig.from_dict(resumed | {k: settings[k] for k in renames}, where=f"--resume {resume}")
        else:
            # options left at the command's defaults (TrainConfig's) give way to MultiTaskConfig's
            mcfg = MultiTaskConfig(**{k: v for k, v in settings.items() if given(k)})
        result = train_multitask(mcfg, library=_library(ctx), progress=not quiet, resume=resume)
        if plot:
            result["plot"] = _plot_curves(result["run_dir"], plot, "multitask: dev score per task", "dev score")
        if as_json:
            _emit(result, True)
            return
        rows = [[t, f"{r['initial']['score']:.4f}" if r.get("initial") else "", f"{r['dev']['score']:.4f}",
                 r.get("saved") or ""] for t, r in result["per_task"].items()]
        click.echo(_table(rows, ["task", "dev before", "dev after", "saved"]))
        if result.get("shared_saved"):
            best = (f" (step {result['shared_best_step']}, mean dev {result['shared_best_mean']:.4f})"
                    if result.get("shared_best_step") is not None else "")
            click.echo(f"shared prompt saved as {result['shared_saved']}{best}")
        return
    from composer.train import train as run_train

    stray = [flag[k] for k in settings if given(k) and k not in field_names(TrainConfig)]
    if stray:
        hint = "; the label-similarity head's temperature is --label-temperature" if "--temperature" in stray else ""
        raise click.UsageError(f"{', '.join(stray)} applies to --multitask runs only{hint}")
    if resumed is not None:
        cfg = TrainConfig.from_dict(resumed | {k: settings[k] for k in renames}, where=f"--resume {resume}")
    else:
        if not settings["task"]:
            raise click.UsageError("give a TASK (or --resume RUN_DIR)")
        cfg = TrainConfig(**{k: v for k, v in settings.items() if k in field_names(TrainConfig)})
    result = run_train(cfg, resume=resume, library=_library(ctx), progress=not quiet)
    if plot:
        result["plot"] = _plot_curves(result["run_dir"], plot, f"{result['task']}: dev {result['metric']}",
                                      f"dev {result['metric']}", name=result["task"])
    if as_json:
        _emit(result, True)
        return
    m = result["metric"]
    before = result.get("initial") or {}
    lines = [(f"task {result['task']} on {result['model']}: {result['steps']} steps in {result['seconds']}s "
              f"(best at step {result['best_step']})")]
    if before:
        lines.append(f"  dev {m}: before {before['score']:.4f} -> after {result['dev']['score']:.4f}")
    if "test" in result:
        lines.append(f"  test {m}: {result['test']['score']:.4f}")
    if result.get("saved"):
        lines.append(f"  saved as '{result['saved']}' in {_library(ctx).root}")
    lines.append(f"  run folder: {result['run_dir']}")
    if result.get("plot"):
        lines.append(f"  learning curve: {result['plot']}")
    click.echo("\n".join(lines))


def _plot_curves(run_dir: str, path: str, title: str, ylabel: str, name: str = "dev") -> str:
    from composer.plots import learning_curves
    from composer.runstate import read_curves

    return str(learning_curves(read_curves(run_dir, name), path, title=title, ylabel=ylabel))


# ---------------------------------------------------------------------------------------------- eval
@cli.command("eval")
@click.argument("name", required=False)
@click.option("--task", "task_name", help="Task to evaluate on (default: the prompt's own task).")
@click.option("--model", help="Backbone (default: the one the prompt was trained on).")
@click.option("--split", default="dev", show_default=True, type=click.Choice(SPLITS))
@click.option("--head", type=click.Choice(HEADS), help="Scoring head (default: the prompt's on its own task).")
@click.option("--max-examples", type=int, help="Evaluate on at most this many examples (seeded subset).")
@data_dir_option(TrainConfig)
@click.option("--matrix", is_flag=True, help="Zero-shot transfer of many prompts (--prompts) on many tasks (--tasks).")
@click.option("--prompts", help="--matrix: comma-separated prompt names (default: all).")
@click.option("--tasks", "tasks_", help="--matrix: comma-separated task names.")
@click.option("--plot", type=OutPath(dir_okay=False), help="--matrix: heatmap PNG.")
@click.option("--num-beams", default=1, show_default=True, type=int, help="Generation tasks: beam width.")
@click.option("--predictions", type=OutPath(dir_okay=False),
              help="Generation tasks: write every generation and its references here (JSON lines).")
@device_option("")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def eval_cmd(ctx, name, task_name, model, split, head, max_examples, data_dir, matrix, prompts, tasks_, plot, num_beams,
             predictions, device, as_json):
    """Evaluate a library prompt on a task's split.

    \b
    Examples:
      prompt-composer eval polarity-minilm --task polarity --json
      prompt-composer eval polarity-minilm --task negated-polarity --split test
      prompt-composer eval --matrix --prompts polarity-minilm,negation-minilm --tasks negated-polarity,topic --json
    """
    from composer.backbones import load_backbone
    from composer.encoding import encode_split
    from composer.evaluate import evaluate
    from composer.model import from_library
    from composer.taskdata import load_splits
    from composer.tasks import load_task

    if max_examples is not None and max_examples <= 0:
        raise click.ClickException(f"--max-examples must be a positive number of examples, got {max_examples}")
    if num_beams <= 0:
        raise click.ClickException(f"--num-beams must be >= 1, got {num_beams}")
    lib = _library(ctx)
    if matrix:
        from composer.transfer import transfer_matrix

        if not tasks_:
            raise click.UsageError("--matrix needs --tasks T1,T2,...")
        names = prompts.split(",") if prompts else lib.names()
        r = transfer_matrix(lib, names, tasks_.split(","), model=model, data_dir=data_dir,
                            max_examples=max_examples or 500, split=split, device=device)
        if plot:
            from composer.plots import similarity_heatmap

            r["plot"] = str(similarity_heatmap(r["scores"], r["prompts"], r["tasks"], plot,
                                               title="zero-shot transfer", cbar_label="dev score"))
        _emit(r, as_json, _table([[p] + [f"{x:.3f}" for x in row] for p, row in zip(r["prompts"], r["scores"])],
                                 ["prompt \\ task"] + r["tasks"]))
        return
    if not name:
        raise click.UsageError("give a prompt NAME (or --matrix)")
    entry = lib.load(name)
    spec = load_task(task_name or entry.meta.get("task"))
    bb = load_backbone(model or entry.meta["backbone"], device=device)
    pm = from_library(entry, bb, spec, head=head)
    splits = load_splits(spec, data_dir=data_dir, splits=[split])
    enc = encode_split(spec, splits[split], bb.tokenizer).subset(max_examples, 0)
    r = evaluate(pm, spec, enc, num_beams=num_beams, keep_predictions=bool(predictions))
    if predictions:
        from composer.evaluate import write_predictions

        write_predictions(predictions, r.pop("predictions", []))
        r["predictions"] = str(predictions)
    r.update(prompt=name, task=spec.name, split=split, backbone=bb.name, head=pm.head.kind)
    others = ("  ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items()) if "metrics" in r
              else f"accuracy {r['accuracy']:.4f}")
    _emit(r, as_json, f"{name} on {spec.name}/{split} ({r['n']} examples): {r['metric']} {r['score']:.4f}  "
                      f"{others}  loss {r['loss']:.4f}")


@cli.command()
@click.argument("name")
@click.option("--input", "inputs", multiple=True, required=True,
              help="One input: its text (a task with one input field), or a JSON object of the task's fields "
                   "('{\"context\": \"...\", \"question\": \"...\"}'); repeat for a batch.")
@click.option("--task", "task_name", help="Task whose template frames the input (default: the prompt's own).")
@click.option("--model", help="Backbone (default: the one the prompt was trained on).")
@click.option("--max-new-tokens", type=int, help="Default: the task's max_target_length.")
@click.option("--num-beams", default=1, show_default=True, type=int)
@device_option("")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def generate(ctx, name, inputs, task_name, model, max_new_tokens, num_beams, device, as_json):
    """Generate text with a library prompt (or prefix) in front of each input.

    \b
    Examples:
      prompt-composer generate e2e-smol --input "name[The Eagle], food[French], area[riverside]"
      prompt-composer generate e2e-smol --input "name[Alimentum]" --input "name[Zizzi]" --num-beams 4 --json
      prompt-composer generate qa-smol --input '{"context": "The Eagle is by the river.", "question": "Where?"}'
    """
    from composer.backbones import load_backbone
    from composer.encoding import encode_rows, eos_id, pad_batch
    from composer.generation import cut_at_stop
    from composer.model import from_library
    from composer.tasks import load_task

    entry = _library(ctx).load(name)
    spec = load_task(task_name or entry.meta.get("task"))
    if not spec.is_generation:
        raise click.ClickException(f"task '{spec.name}' is not a generation task; use `prompt-composer eval`")
    bb = load_backbone(model or entry.meta["backbone"], device=device)
    pm = from_library(entry, bb, spec).eval()
    rows = [_input_row(spec, text) for text in inputs]
    ids, mask = pad_batch(encode_rows(bb.tokenizer, spec.template, rows, spec.max_length), bb.tokenizer.pad_token_id)
    new = pm.generate(ids.to(pm.device), mask.to(pm.device), max_new_tokens=max_new_tokens or spec.max_target_length,
                      num_beams=num_beams, stop=spec.stop)
    eos, texts = eos_id(bb.tokenizer), []
    for row in new.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(cut_at_stop(bb.tokenizer.decode(row, skip_special_tokens=True), spec.stop))
    _emit({"prompt": name, "task": spec.name, "inputs": list(inputs), "generations": texts}, as_json,
          "\n".join(texts))


def _input_row(spec, text: str) -> dict[str, str]:
    """One --input as a row of the fields the task's template reads: a JSON object of them, or the text of a
    one-field template (the other input fields, which only the target may name, stay empty)."""
    from composer.templates import template_fields

    fields = list(template_fields(spec.template))
    if text.lstrip().startswith("{"):
        try:
            row = json.loads(text)
        except ValueError as e:
            raise click.BadParameter(f"{text[:60]!r} starts like JSON but does not parse ({e})",
                                     param_hint="--input") from None
        if not isinstance(row, dict):
            raise click.BadParameter("a JSON input must be an object of the task's fields", param_hint="--input")
        unknown, missing = sorted(set(row) - set(fields)), [f for f in fields if f not in row]
        if unknown or missing:
            wrong = [f"{what}: {', '.join(names)}" for what, names in (("unknown", unknown), ("missing", missing))
                     if names]
            raise click.BadParameter(f"task '{spec.name}' takes the fields {', '.join(fields)} ({'; '.join(wrong)})",
                                     param_hint="--input")
        return {f: str(row.get(f, "")) for f in spec.inputs}
    if len(fields) > 1:
        example = json.dumps({f: "..." for f in fields})
        raise click.BadParameter(f"task '{spec.name}' takes {len(fields)} input fields ({', '.join(fields)}): give "
                                 f"each --input as a JSON object, e.g. '{example}'", param_hint="--input")
    return {f: (text if f in fields else "") for f in spec.inputs}


# --------------------------------------------------------------------------------------------- graph
@cli.group()
def graph():
    """Show, validate, draw and link task graphs (graphs/NAME.yaml or node-link JSON)."""


def _graph_summary(G) -> dict:
    from composer import graph as G_

    nodes = [{"name": n, **{k: v for k, v in d.items()}} for n, d in G.nodes(data=True)]
    edges = [{"source": u, "target": v, "key": k, **d} for u, v, k, d in G.edges(keys=True, data=True)]
    targets = [n for n, d in G.nodes(data=True) if d.get("role") == "target"]
    return {"name": G.graph.get("name"), "backbone": G.graph.get("backbone"), "nodes": nodes, "edges": edges,
            "subtasks": {t: [s for s, _ in G_.subtasks(G, t)] for t in targets}}


@graph.command("show")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--json", "as_json", is_flag=True)
def graph_show(graph_path, as_json):
    """Nodes (role, task, prompt) and edges (part_of, similar) of a graph."""
    from composer import graph as G_

    G = G_.load_graph(graph_path)
    d = _graph_summary(G)
    if as_json:
        _emit(d, True)
        return
    click.echo(f"graph {d['name']} (backbone {d['backbone']}): {len(d['nodes'])} nodes, {len(d['edges'])} edges")
    click.echo(_table([[n["name"], n.get("role"), n.get("task"), n.get("prompt") or ""] for n in d["nodes"]],
                      ["node", "role", "task", "prompt"]))
    if d["edges"]:
        click.echo("")
        click.echo(_table([[e["source"], e.get("relation"), e["target"],
                            "" if e.get("weight") is None else f"{e['weight']:.3f}", e.get("metric") or ""]
                           for e in d["edges"]], ["from", "edge", "to", "weight", "metric"]))


@graph.command("validate")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--prompts/--no-prompts", "check_prompts", default=None,
              help="Check that every named prompt is in the library (default: when the library has any).")
@click.option("--strict", is_flag=True,
              help="Also fail when a target's prompt is not in the library yet (by default a note: targets are "
                   "what gets composed and trained).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def graph_validate(ctx, graph_path, check_prompts, strict, as_json):
    """Report every fault of a graph, one per line (exit 1 when there is any).

    A target whose prompt is not in the library yet is not a fault (it is trained or composed from this
    graph): one line says which; --strict counts it as one. A missing source or subtask prompt is a fault.
    """
    from composer import graph as G_
    from composer.tasks import list_tasks

    G = G_.load_graph(graph_path)
    lib = _library(ctx)
    if check_prompts is None:
        check_prompts = bool(lib.names())
    known = set(list_tasks())
    untrained_ok = () if strict else ("target",)
    faults = G_.validate(G, library=lib if check_prompts else None, task_exists=lambda t: t in known,
                         untrained_ok=untrained_ok)
    untrained = sorted(d["prompt"] for _, d in G.nodes(data=True)
                       if check_prompts and d.get("role") in untrained_ok and d.get("prompt")
                       and not lib.exists(d["prompt"]))
    note = (f"{len(untrained)} target prompt(s) not trained yet: {', '.join(untrained)} (compose or train them; "
            "--strict counts this as a fault)") if untrained else None
    name = G.graph.get("name")
    if as_json:
        _emit({"graph": name, "ok": not faults, "faults": faults, "untrained": untrained}, True)
    elif faults:
        for f in faults:
            click.echo(f, err=True)
        if note:
            click.echo(note, err=True)
    else:
        click.echo(f"graph {name}: ok ({G.number_of_nodes()} nodes, {G.number_of_edges()} edges)"
                   + (f"; {note}" if note else ""))
    if faults:
        ctx.exit(1)


@graph.command("draw")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--out", required=True, type=OutPath(dir_okay=False), help="PNG file to write.")
def graph_draw(graph_path, out):
    """Draw a graph as PNG: roles as colours, part_of solid, similar dashed, weights on the edges."""
    from composer import graph as G_
    from composer.plots import draw_graph

    G = G_.load_graph(graph_path)
    click.echo(str(draw_graph(G, out, title=G.graph.get("name"))))


@graph.command("link")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--metric", default="cos-avg", show_default=True,
              help=_choice_help(LINK_METRICS) + " (transfer: the zero-shot score on the target).")
@click.option("--top-k", default=3, show_default=True, type=int)
@click.option("--target", "targets", multiple=True, help="Only these targets (default: every target node).")
@click.option("--max-examples", default=300, show_default=True, type=int, help="transfer: dev examples per target.")
@data_dir_option(TrainConfig)
@click.option("--out", required=True, type=OutPath(dir_okay=False), help="Where to write the linked graph (JSON).")
@device_option("transfer, on: ")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def graph_link(ctx, graph_path, metric, top_k, targets, max_examples, data_dir, out, device, as_json):
    """Add similar edges (top-k sources per target) measured from the library's prompts."""
    from composer import graph as G_
    from composer.transfer import link_graph

    if max_examples <= 0:
        raise click.ClickException(f"--max-examples must be a positive number of examples, got {max_examples}")
    G = G_.check(G_.load_graph(graph_path))
    r = link_graph(G, _library(ctx), metric=metric, top_k=top_k, targets=list(targets) or None, data_dir=data_dir,
                   max_examples=max_examples, device=device)
    G_.save_graph(G, out)
    r["out"] = out
    if as_json:
        _emit(r, True)
        return
    for t, sc in r["scores"].items():
        click.echo(f"{t}: " + ", ".join(f"{n} {v:.3f}" for n, v in list(sc.items())[:top_k]))
    for t, why in r["skipped"].items():
        click.echo(f"skipped {t}: {why}", err=True)
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------------------------------- similarity
@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every prompt in the library.")
@click.option("--metric", default="cos-avg", show_default=True, help=_choice_help(SIMILARITY_METRICS))
@click.option("--model", help="Backbone for --metric on (default: the prompts').")
@device_option("--metric on: ")
@click.option("--plot", type=OutPath(dir_okay=False), help="Write a heatmap PNG.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def similarity(ctx, names, all_, metric, model, device, plot, as_json):
    """All-pairs similarity of library prompts.

    \b
    Examples:
      prompt-composer similarity polarity-minilm negation-minilm topic-minilm --metric on --json
      prompt-composer similarity --all --metric cos-tok --plot similarity.png
    """
    from composer.backbones import load_backbone
    from composer.similarity import check_metric
    from composer.transfer import similarity_matrix

    check_metric(metric)
    lib = _library(ctx)
    names = list(lib.names() if all_ else names)
    if len(names) < 2:
        raise click.UsageError("name two or more prompts, or pass --all")
    m = similarity_matrix(lib, names, metric, backbone=load_backbone(model, device=device) if model else None,
                          device=device)
    d = {"metric": metric, "names": names, "matrix": [[round(float(x), 6) for x in row] for row in m]}
    if plot:
        from composer.plots import similarity_heatmap

        d["plot"] = str(similarity_heatmap(m, names, names, plot, title=f"prompt similarity ({metric})"))
    if as_json:
        _emit(d, True)
        return
    click.echo(_table([[n] + [f"{x:.3f}" for x in row] for n, row in zip(names, d["matrix"])], [metric] + names))


# ------------------------------------------------------------------------------------------- compose
@cli.command()
@option_from(ComposeConfig, "graph")
@option_from(ComposeConfig, "target")
@option_from(ComposeConfig, "strategy")
@option_from(ComposeConfig, "top_k")
@option_from(ComposeConfig, "metric")
@option_from(ComposeConfig, "shots")
@option_from(ComposeConfig, "method")
@option_from(ComposeConfig, "l1")
@option_from(ComposeConfig, "min_weight")
@option_from(ComposeConfig, "max_weight")
@option_from(ComposeConfig, "mix_temperature")
@option_from(ComposeConfig, "steps")
@option_from(ComposeConfig, "distill")
@option_from(ComposeConfig, "base")
@option_from(ComposeConfig, "density", "--trim")
@option_from(ComposeConfig, "dare")
@option_from(ComposeConfig, "scale")
@option_from(ComposeConfig, "backbone")
@option_from(ComposeConfig, "device")
@option_from(ComposeConfig, "seed")
@data_dir_option(ComposeConfig)
@option_from(ComposeConfig, "save")
@option_from(ComposeConfig, "out_graph", type=OutPath(dir_okay=False))
@click.option("--plot", type=OutPath(dir_okay=False), help="attention: PNG of the weights per class.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def compose(ctx, plot, as_json, **settings):
    """Compose TARGET's prompt from its subtasks and top-k similar sources in GRAPH.

    \b
    Examples:
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy attention --save np-attn
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy linear --shots 16 --save np-lin --json
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy linear --min-weight 0 --save np-lin0
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy average --top-k 3 --metric cos-avg
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy concat
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy ties --density 0.2 --save np-ties
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy arithmetic --scale 0.5 --base zeros
    """
    from composer import graph as G_
    from composer.compose import compose as run_compose

    cfg = ComposeConfig(**settings)
    r = run_compose(cfg, library=_library(ctx))
    if plot and r.get("per_class"):
        from composer.plots import weights_per_class

        r["plot"] = str(weights_per_class(r["per_class"], r["candidates"] + ["(target)"], plot,
                                          title=f"{cfg.target}: attention weights per class"))
    if as_json:
        _emit(r, True)
        return
    rows = [[c, rel, f"{w:+.3f}"] for c, rel, w in zip(r["candidates"], r["relations"], r["weights"])]
    lines = [f"{cfg.strategy} composition of {cfg.target}: prompt {r['shape']}"
             + (f", saved as '{r['saved']}'" if r.get("saved") else ""), _table(rows, ["candidate", "edge", "weight"])]
    if "optimizer" in r:
        o = r["optimizer"]
        lines.append(f"optimizer {o.get('method')}: loss {o['loss']:.4f}, converged {o['converged']} ({o['message']})")
    click.echo("\n".join(lines))


# ------------------------------------------------------------------------------------------- library
@cli.group()
def library():
    """List, show, remove, export and import library prompts."""


@library.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def library_list(ctx, as_json):
    """List the prompts in the library."""
    lib = _library(ctx)
    rows = []
    for n in lib.names():
        try:
            m = lib.meta(n)
        except ComposerError as e:
            rows.append({"name": n, "error": str(e)})
            continue
        metrics = m.get("metrics") or {}
        dev = (metrics.get("dev") or {}).get("score")
        rows.append({"name": n, "task": m.get("task"), "backbone": m.get("backbone"), "length": m.get("length"),
                     "hidden_size": m.get("hidden_size"), "head": m.get("head"), "dev": dev,
                     "strategy": (m.get("provenance") or {}).get("strategy") or (m.get("provenance") or {}).get("init"),
                     "created": m.get("created")})
    for n in lib.broken():  # shown, as a truncated prompt.json is, so that `rm` can be given its name
        rows.append({"name": n, "error": f"broken: no prompt.json (remove it with `prompt-composer library rm {n}`)"})
    rows.sort(key=lambda r: r["name"])
    if as_json:
        _emit({"library": str(lib.root), "prompts": rows}, True)
        return
    if not rows:
        click.echo(f"no prompts in {lib.root}")
        return
    click.echo(_table([[r["name"], r.get("task", "!"), r.get("backbone", ""), r.get("length", ""),
                        "" if r.get("dev") is None else f"{r['dev']:.4f}", r.get("strategy") or "",
                        r.get("created", r.get("error", ""))] for r in rows],
                      ["name", "task", "backbone", "P", "dev", "from", "created"]))


@library.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def library_show(ctx, name, as_json):
    """Show a prompt's metadata (prompt.json) and tensor statistics."""
    entry = _library(ctx).load(name)
    p = entry.prompt
    d = dict(entry.meta, path=str(entry.path),
             stats={"shape": list(p.shape), "mean_norm": float(p.norm(dim=-1).mean()), "std": float(p.std())})
    _emit(d, as_json, json.dumps(d, indent=2, sort_keys=True, default=str))


@library.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def library_rm(ctx, names):
    """Remove prompts from the library."""
    lib = _library(ctx)
    for n in names:
        lib.remove(n)
        click.echo(f"removed {n}", err=True)


@library.command("export-peft")
@click.argument("name")
@click.argument("out_dir", type=OutPath(file_okay=False))
@click.option("--base-model", help="base_model_name_or_path to record (default: the prompt's backbone hub id or path).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.pass_context
def library_export_peft(ctx, name, out_dir, base_model, force):
    """Export a static prompt as a PEFT prompt-tuning adapter (loads with peft.PeftModel.from_pretrained)."""
    from composer.peft_io import export_peft

    path = export_peft(_library(ctx), name, out_dir, base_model_name_or_path=base_model, overwrite=force)
    click.echo(str(path))


@library.command("import-peft")
@click.argument("adapter_dir", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Library name for the imported prompt.")
@click.option("--backbone", help="Backbone to record (default: the adapter's base model).")
@click.option("--task", "task_name", help="Task the prompt was trained on.")
@click.option("--force", is_flag=True, help="Replace an existing library prompt of that name.")
@click.pass_context
def library_import_peft(ctx, adapter_dir, name, backbone, task_name, force):
    """Import a PEFT prompt-tuning adapter into the library."""
    from composer.names import check_name
    from composer.peft_io import import_peft

    check_name(name, "--name")  # before the adapter is read
    e = import_peft(_library(ctx), adapter_dir, name, backbone_name=backbone, task=task_name, overwrite=force)
    click.echo(f"imported {e.name}: [{e.prompt.shape[0]}, {e.prompt.shape[1]}] for {e.meta.get('backbone')}")


# ---------------------------------------------------------------------------------------------- demo
@cli.command()
@option_from(DemoConfig, "backbone")
@option_from(DemoConfig, "out", type=OutPath(file_okay=False))
@option_from(DemoConfig, "source_steps")
@option_from(DemoConfig, "target_steps")
@option_from(DemoConfig, "k_shot")
@option_from(DemoConfig, "targets")
@option_from(DemoConfig, "seed")
@option_from(DemoConfig, "kind")
@option_from(DemoConfig, "lr")
@option_from(DemoConfig, "retrain")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def demo(ctx, quiet, as_json, **settings):
    """The whole pipeline on the built-in suite: sources -> graph -> compose -> tune -> report.

    Trains (or reuses) the subtask prompts, links the demo graph, composes negated-polarity and
    topic-polarity with every strategy, tunes each next to a random-init baseline, and writes
    OUT/report.md with the table, the graph picture and the learning curves.
    """
    from composer.demo import results_table, run_demo

    cfg = DemoConfig(**(settings | {"targets": tuple(settings["targets"])}))
    report = run_demo(cfg, library=_library(ctx), progress=not quiet,
                      echo=lambda m: click.echo(m, err=True))
    if as_json:
        _emit(report, True)
        return
    click.echo(results_table(report))
    click.echo(f"\nreport: {Path(cfg.out) / 'report.md'} ({report['seconds']} s)")


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
