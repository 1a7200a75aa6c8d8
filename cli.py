"""prompt-composer's command line: parse, build a config, call one library function, print.

Data goes to stdout (one JSON document with --json); progress and logs go to stderr.
Exit codes: 0 done, 1 failed (one line: what, the value, the fix), 2 bad invocation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import click

# offline by default: nothing is fetched from a hub unless a command is told it may
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from composer.errors import ComposerError  # noqa: E402

log = logging.getLogger("prompt_composer")


class App(click.Group):
    """Turns library errors into one line (exit 1); --debug shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ComposerError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


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


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--library", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_LIBRARY",
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
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


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
    from composer.tasks import load_task

    spec = load_task(name)
    d = spec.to_dict() if hasattr(spec, "to_dict") else vars(spec)
    import yaml

    _emit(d, as_json, yaml.safe_dump(d, sort_keys=False, allow_unicode=True).rstrip())


@task.command("check")
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder the task's data paths are relative to.")
@click.option("--json", "as_json", is_flag=True)
def task_check(name, data_dir, as_json):
    """Load every split of a task and count rows and labels."""
    from composer.taskdata import check_task
    from composer.tasks import load_task

    summary = check_task(load_task(name), data_dir)
    if as_json:
        _emit(summary, True)
        return
    import yaml

    click.echo(yaml.safe_dump(summary, sort_keys=False).rstrip())


# --------------------------------------------------------------------------------------------- train
@cli.command()
@click.argument("task_name", metavar="TASK", required=False)
@click.option("--model", default="minilm", show_default=True,
              help="Backbone: alias (minilm, smollm2-135m), path or hub id (--multitask: the graph's, else minilm).")
@click.option("--head", type=click.Choice(["verbalizer", "label-similarity", "mlm", "linear"]),
              help="Default: label-similarity on encoders (mlm when the checkpoint has its MLM head), else verbalizer.")
@click.option("--prompt-length", default=20, show_default=True, type=int)
@click.option("--init", default="random", show_default=True, help="random | vocab | text | text:WORDS | library:NAME")
@click.option("--mode", type=click.Choice(["prompt", "joint"]), default="prompt", show_default=True)
@click.option("--unfreeze", default="all", show_default=True, help="Joint mode: all | last:N | bias | none.")
@click.option("--steps", default=300, show_default=True, type=int, help="--multitask default: 1000.")
@click.option("--batch-size", default=16, show_default=True, type=int, help="--multitask default: 32.")
@click.option("--lr", "--prompt-lr", "lr", default=0.3, show_default=True, type=float, help="Prompt learning rate.")
@click.option("--model-lr", default=2e-5, show_default=True, type=float, help="Backbone learning rate (joint).")
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", show_default=True)
@click.option("--warmup", default=0.06, show_default=True, type=float, help="Warm-up fraction of the steps.")
@click.option("--eval-every", default=50, show_default=True, type=int, help="--multitask default: 100.")
@click.option("--max-eval", default=1000, show_default=True, type=int,
              help="Dev examples used during training (--multitask default: 500).")
@click.option("--patience", default=0, show_default=True, type=int, help="Early stop after N evals without gain.")
@click.option("--k-shot", type=int, help="Train on k examples per class.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--label-temperature", default=0.05, show_default=True, type=float,
              help="Temperature of the label-similarity head (cosine / T).")
@click.option("--temperature", type=float,
              help="--multitask: task-sampling temperature T, task i drawn in proportion to n_i ** (1/T) (default 1).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")
@click.option("--save", help="Save the best prompt to the library under this name.")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run folder (default runs/SAVE or runs/TASK-TIME).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this folder.")
@click.option("--multitask", is_flag=True, help="Train many tasks at once (--graph or --tasks), mixed batches.")
@click.option("--graph", "graph_path", help="--multitask: every task of this graph.")
@click.option("--tasks", "task_list", help="--multitask: comma-separated task names.")
@click.option("--composer", "composer_kind", type=click.Choice(["none", "attention"]), default="none", show_default=True,
              help="--multitask: one attention module shared across tasks over the graph's source prompts.")
@click.option("--save-prefix", help="--multitask: save each task's best prompt as PREFIX+TASK.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the dev learning curve(s) as a PNG.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def train(ctx, task_name, model, head, prompt_length, init, mode, unfreeze, steps, batch_size, lr, model_lr, schedule,
          warmup, eval_every, max_eval, patience, k_shot, seed, label_temperature, temperature, mixed_precision,
          gradient_checkpointing, data_dir, save, run_dir, resume, multitask, graph_path, task_list, composer_kind,
          save_prefix, plot, quiet, as_json):
    """Tune a soft prompt (and, with --mode joint, the backbone) on TASK.

    \b
    Examples:
      prompt-composer train polarity --model minilm --prompt-length 20 --steps 300 --save polarity-minilm
      prompt-composer train sst2 --model smollm2-135m --data-dir ../shared/data --steps 50 --save sst2-smol
      prompt-composer train rte --init library:rte-composed --mode joint --unfreeze last:2 --save rte-joint
      prompt-composer train polarity --resume runs/polarity-minilm
      prompt-composer train --graph graphs/demo.yaml --multitask --temperature 2 --steps 2000 --save-prefix mt-
    """
    from composer.train import TrainConfig, train as run_train

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    def flag(name: str) -> str:
        return {"task_list": "--tasks", "graph_path": "--graph", "composer_kind": "--composer",
                "task_name": "TASK"}.get(name, "--" + name.replace("_", "-"))

    resumed = None
    if resume and not (task_name or graph_path or task_list):
        cfg_file = Path(resume) / "config.json"
        if not cfg_file.exists():
            raise click.ClickException(f"--resume {resume}: no config.json there; is it a run folder?")
        resumed = json.loads(cfg_file.read_text())
        extra = [flag(k) for k in ctx.params if k not in ("resume", "multitask", "plot", "quiet", "as_json")
                 and ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE]
        if extra:
            raise click.UsageError(f"--resume {resume} goes on with the run's own settings (its config.json); "
                                   f"drop {', '.join(extra)}")
        multitask = multitask or "tasks" in resumed
    if multitask or graph_path or task_list:
        from composer.multitask import MultiTaskConfig, train_multitask

        if resumed is None and not (graph_path or task_list):
            raise click.UsageError("--multitask needs --graph GRAPH or --tasks a,b,...")
        fields = {f.name for f in dataclasses.fields(MultiTaskConfig)}
        own = {"multitask", "graph_path", "task_list", "composer_kind", "resume", "plot", "quiet", "as_json"}
        stray = [flag(k) for k in ctx.params if given(k) and k not in fields | own]
        if stray:
            hint = " (each task's prompt is saved with --save-prefix PREFIX)" if "--save" in stray else ""
            raise click.UsageError(f"{', '.join(stray)} does not apply to a multitask run{hint}")
        if resumed is not None:
            mcfg = MultiTaskConfig.from_dict(resumed, where=f"--resume {resume}")
        else:
            # options left at the command's defaults give way to MultiTaskConfig's (more steps, larger batches)
            mcfg = MultiTaskConfig(tasks=task_list, graph=graph_path, composer=composer_kind,
                                   **{k: ctx.params[k] for k in fields & set(ctx.params) if given(k)})
        result = train_multitask(mcfg, library=_library(ctx), progress=not quiet, resume=resume)
        if plot:
            result["plot"] = _plot_curves(result["run_dir"], plot, "multitask: dev score per task", "dev score")
        if as_json:
            _emit(result, True)
            return
        rows = [[t, f"{r['initial']['score']:.4f}" if r.get("initial") else "", f"{r['dev']['score']:.4f}",
                 r.get("saved") or ""] for t, r in result["per_task"].items()]
        click.echo(_table(rows, ["task", "dev before", "dev after", "saved"]))
        return
    stray = [flag(k) for k in ("temperature", "composer_kind", "save_prefix") if given(k)]
    if stray:
        hint = "; the label-similarity head's temperature is --label-temperature" if "--temperature" in stray else ""
        raise click.UsageError(f"{', '.join(stray)} applies to --multitask runs only{hint}")
    if resumed is not None:
        cfg = TrainConfig.from_dict(resumed, where=f"--resume {resume}")
    else:
        if not task_name:
            raise click.UsageError("give a TASK (or --resume RUN_DIR)")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}  # the command's defaults are TrainConfig's
        cfg = TrainConfig(task=task_name, **{k: ctx.params[k] for k in fields & set(ctx.params)})
    result = run_train(cfg, resume=resume, library=_library(ctx), progress=not quiet)
    if plot:
        result["plot"] = _plot_curves(result["run_dir"], plot, f"{result['task']}: dev {result['metric']}",
                                      f"dev {result['metric']}", name=result["task"])
    if as_json:
        _emit(result, True)
        return
    m = result["metric"]
    before = result.get("initial") or {}
    lines = [f"task {result['task']} on {result['model']}: {result['steps']} steps in {result['seconds']}s "
             f"(best at step {result['best_step']})"]
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
@click.option("--split", default="dev", show_default=True, type=click.Choice(["train", "dev", "test"]))
@click.option("--head", type=click.Choice(["verbalizer", "label-similarity", "mlm", "linear"]))
@click.option("--max-examples", type=int, help="Evaluate on at most this many examples (seeded subset).")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")
@click.option("--matrix", is_flag=True, help="Zero-shot transfer of many prompts (--prompts) on many tasks (--tasks).")
@click.option("--prompts", help="--matrix: comma-separated prompt names (default: all).")
@click.option("--tasks", "tasks_", help="--matrix: comma-separated task names.")
@click.option("--plot", type=click.Path(dir_okay=False), help="--matrix: heatmap PNG.")
@click.option("--device", default="auto", show_default=True,
              help="Where the backbone runs (auto: CUDA when there is one; cpu, cuda:N).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def eval_cmd(ctx, name, task_name, model, split, head, max_examples, data_dir, matrix, prompts, tasks_, plot, device,
             as_json):
    """Evaluate a library prompt on a task's split.

    \b
    Examples:
      prompt-composer eval polarity-minilm --task polarity --json
      prompt-composer eval polarity-minilm --task negated-polarity --split test
      prompt-composer eval --matrix --prompts polarity-minilm,negation-minilm --tasks negated-polarity,topic --json
    """
    from composer.backbones import load_backbone
    from composer.build import encode_split, from_library
    from composer.evaluate import evaluate
    from composer.taskdata import load_splits
    from composer.tasks import load_task
    from composer.train import _subset

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
    enc = _subset(encode_split(spec, splits[split], bb.tokenizer), max_examples, 0)
    r = evaluate(pm, spec, enc)
    r.update(prompt=name, task=spec.name, split=split, backbone=bb.name, head=pm.head.kind)
    _emit(r, as_json, f"{name} on {spec.name}/{split} ({r['n']} examples): {r['metric']} {r['score']:.4f}  "
                      f"accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}")


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
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def graph_validate(ctx, graph_path, check_prompts, as_json):
    """Report every fault of a graph, one per line (exit 1 when there is any)."""
    from composer import graph as G_
    from composer.tasks import list_tasks

    G = G_.load_graph(graph_path)
    lib = _library(ctx)
    if check_prompts is None:
        check_prompts = bool(lib.names())
    known = set(list_tasks())
    faults = G_.validate(G, library=lib if check_prompts else None, task_exists=lambda t: t in known)
    if as_json:
        _emit({"graph": G.graph.get("name"), "ok": not faults, "faults": faults}, True)
    elif faults:
        for f in faults:
            click.echo(f, err=True)
    else:
        click.echo(f"graph {G.graph.get('name')}: ok ({G.number_of_nodes()} nodes, {G.number_of_edges()} edges)")
    if faults:
        ctx.exit(1)


@graph.command("draw")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
def graph_draw(graph_path, out):
    """Draw a graph as PNG: roles as colours, part_of solid, similar dashed, weights on the edges."""
    from composer import graph as G_
    from composer.plots import draw_graph

    G = G_.load_graph(graph_path)
    click.echo(str(draw_graph(G, out, title=G.graph.get("name"))))


@graph.command("link")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--metric", default="cos-avg", show_default=True,
              help="cos-avg | euclid-avg | cos-tok | euclid-tok | on | transfer (zero-shot score on the target).")
@click.option("--top-k", default=3, show_default=True, type=int)
@click.option("--target", "targets", multiple=True, help="Only these targets (default: every target node).")
@click.option("--max-examples", default=300, show_default=True, type=int, help="transfer: dev examples per target.")
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the linked graph (JSON).")
@click.option("--device", default="auto", show_default=True,
              help="transfer, on: where the backbone runs (auto: CUDA when there is one; cpu, cuda:N).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def graph_link(ctx, graph_path, metric, top_k, targets, max_examples, data_dir, out, device, as_json):
    """Add similar edges (top-k sources per target) measured from the library's prompts."""
    from composer import graph as G_
    from composer.transfer import link_graph

    G = G_.load_graph(graph_path)
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
@click.option("--metric", default="cos-avg", show_default=True, help="cos-avg | euclid-avg | cos-tok | euclid-tok | on")
@click.option("--model", help="Backbone for --metric on (default: the prompts').")
@click.option("--device", default="auto", show_default=True,
              help="--metric on: where the backbone runs (auto: CUDA when there is one; cpu, cuda:N).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
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
@click.argument("graph_path", metavar="GRAPH")
@click.option("--target", required=True, help="Target node of the graph.")
@click.option("--strategy", type=click.Choice(["best", "average", "linear", "attention", "concat"]),
              default="attention", show_default=True)
@click.option("--top-k", default=3, show_default=True, type=int, help="Similar sources joining the subtasks.")
@click.option("--metric", help="Follow similar edges of this metric (default: any one).")
@click.option("--shots", default=16, show_default=True, type=int, help="Target examples per class (best, linear, attention).")
@click.option("--method", type=click.Choice(["lbfgs", "powell", "nelder-mead"]), default="lbfgs", show_default=True,
              help="linear: gradient-based (lbfgs) or gradient-free.")
@click.option("--l1", default=0.05, show_default=True, type=float, help="linear: L1 penalty on the weights.")
@click.option("--temperature", type=float, help="average: softmax temperature (default: normalised weights); "
              "attention: default H*e.")
@click.option("--steps", default=0, show_default=True, type=int,
              help="attention: fit the module on the shots first; best: tune each candidate this many steps on "
                   "the shots before scoring it (SPoT).")
@click.option("--distill", is_flag=True, help="attention: save one static prompt (the mean mixture), e.g. for PEFT.")
@click.option("--model", help="Backbone (default: the candidates').")
@click.option("--device", default="auto", show_default=True,
              help="best, linear, attention: where the backbone runs (auto: CUDA when there is one; cpu, cuda:N).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="PROMPT_COMPOSER_DATA")
@click.option("--save", help="Library name for the composed prompt.")
@click.option("--out", "out_graph", type=click.Path(dir_okay=False), help="Write the graph with the weights (JSON).")
@click.option("--plot", type=click.Path(dir_okay=False), help="attention: PNG of the weights per class.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def compose(ctx, graph_path, target, strategy, top_k, metric, shots, method, l1, temperature, steps, distill, model,
            device, seed, data_dir, save, out_graph, plot, as_json):
    """Compose TARGET's prompt from its subtasks and top-k similar sources in GRAPH.

    \b
    Examples:
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy attention --save np-attn
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy linear --shots 16 --save np-lin --json
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy average --top-k 3 --metric cos-avg
      prompt-composer compose graphs/demo.yaml --target negated-polarity --strategy concat
    """
    from composer.compose import ComposeConfig, compose as run_compose

    cfg = ComposeConfig(graph=graph_path, target=target, strategy=strategy, top_k=top_k, metric=metric, shots=shots,
                        method=method, l1=l1, temperature=temperature, steps=steps, distill=distill, seed=seed,
                        model=model, device=device, data_dir=data_dir, save=save, out_graph=out_graph)
    r = run_compose(cfg, library=_library(ctx))
    if plot and r.get("per_class"):
        from composer.plots import weights_per_class

        r["plot"] = str(weights_per_class(r["per_class"], r["candidates"] + ["(target)"], plot,
                                          title=f"{target}: attention weights per class"))
    if as_json:
        _emit(r, True)
        return
    rows = [[c, rel, f"{w:+.3f}"] for c, rel, w in zip(r["candidates"], r["relations"], r["weights"])]
    lines = [f"{strategy} composition of {target}: prompt {r['shape']}"
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
@click.argument("out_dir", type=click.Path(file_okay=False))
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
    from composer.peft_io import import_peft

    e = import_peft(_library(ctx), adapter_dir, name, backbone_name=backbone, task=task_name, overwrite=force)
    click.echo(f"imported {e.name}: [{e.prompt.shape[0]}, {e.prompt.shape[1]}] for {e.meta.get('backbone')}")


# ---------------------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--source-steps", default=80, show_default=True, type=int)
@click.option("--target-steps", default=40, show_default=True, type=int)
@click.option("--k-shot", default=16, show_default=True, type=int, help="Target training examples per class.")
@click.option("--target", "targets", multiple=True, help="Targets to compose (default: negated-polarity, topic-polarity).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--retrain", is_flag=True, help="Retrain the subtask prompts even if the library has them.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def demo(ctx, model, out, source_steps, target_steps, k_shot, targets, seed, retrain, quiet, as_json):
    """The whole pipeline on the built-in suite: sources -> graph -> compose -> tune -> report.

    Trains (or reuses) the subtask prompts, links the demo graph, composes negated-polarity and
    topic-polarity with every strategy, tunes each next to a random-init baseline, and writes
    OUT/report.md with the table, the graph picture and the learning curves.
    """
    from composer.demo import DemoConfig, results_table, run_demo

    cfg = DemoConfig(model=model, out=out, source_steps=source_steps, target_steps=target_steps, k_shot=k_shot,
                     seed=seed, retrain=retrain, **({"targets": tuple(targets)} if targets else {}))
    report = run_demo(cfg, library=_library(ctx), progress=not quiet,
                      echo=lambda m: click.echo(m, err=True))
    if as_json:
        _emit(report, True)
        return
    click.echo(results_table(report))
    click.echo(f"\nreport: {Path(out) / 'report.md'} ({report['seconds']} s)")


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
