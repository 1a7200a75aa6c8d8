"""Multi-task training: many tasks at once on one shared backbone, each task with its own prompt and head.

    train_multitask(MultiTaskConfig(tasks=["sst2", "rte"]))        # a list of tasks
    train_multitask(MultiTaskConfig(graph="demo"))                  # every node of a task graph

One ``MultiTaskModel`` (composer/model.py) holds the backbone once, a prompt source and a scoring head per
task (heads and label sets may differ: label-similarity for one task, linear with 5 classes for another).
A global batch mixes tasks: ``MixturePlan`` (composer/runstate.py) draws each position's task with
probability proportional to n_i ** (1 / temperature) (n_i = task i's training examples: T = 1 samples by
size, a large T uniformly), then takes the next example of that task's own permutation stream. The batch
at step s is a pure function of (seed, s), so a resumed run needs no sampler state. The model runs each
task's rows of the batch through the backbone with that task's prompt and head.

The loop is train.py's in shape, and shares its parts (composer/loop.py: the optimizer, one training step,
the run folder, the split choice): per-task evaluation on each task's dev subset every ``eval_every`` steps, a best checkpoint per
task (run_dir/best/TASK/: the whole trainable state at that task's best step), and at the end each task's
best prompt goes into the library as ``{save_prefix}{task}`` with provenance {"multitask": [...],
"temperature": T}.

``composer="attention"`` follows ATTEMPT's multi-task setting (Asai et al., 2022): the candidates are
frozen *source* prompts from the library (``sources``, or the prompts of the graph's source and subtask
nodes), every task trains its own target prompt, and ONE attention module (down/up projection and
LayerNorm) is shared by all tasks, so what it learns about routing inputs to sources is learnt from every
task's data. Each task's prompt is per example: target_t + sum_j a_j(x) [sources, target_t]_j. The library
entry of a task holds its distilled static prompt and the full composer (shared module included), so it
loads back with ``--init library:NAME`` like any composed prompt.

One backbone serves every task by construction; what can still mismatch is a library prompt (an init or an
attention source) trained on another backbone, and that stops the run before anything trains.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from composer import graph as G_
from composer.attention import AttentionComposer, MixtureSource
from composer.backbones import Backbone, load_backbone
from composer.config import MultiTaskConfig
from composer.encoding import pad_batch
from composer.errors import ComposerError, TrainingError
from composer.mpt import build_mpt_model, save_mpt_entry
from composer.evaluate import evaluate
from composer.heads import resolve_head
from composer.library import Library, check_compatible, check_name
from composer.lora import add_lora
from composer.loop import (Optimizer, RunFolder, check_resume, encode_splits, make_accelerator, out_of_patience,
                           seed_step, training_step)
from composer.model import MultiTaskModel, build_model, check_positions
from composer.prompts import init_prompt
from composer.runstate import MixturePlan, load_trainable, progress_bar, save_trainable, shard, trainable_state
from composer.taskdata import load_splits
from composer.tasks import load_task
from composer.train import Prepared, save_to_library

log = logging.getLogger(__name__)

SHARED = "shared"
"""--shared mpt / mixture: the library entry PREFIX+shared, and (mixture) its best snapshot's folder best/shared/."""

__all__ = ["MultiTaskConfig", "MultiPrepared", "resolve_tasks", "prepare_multitask", "train_multitask"]


def _shared_attention(stack: torch.Tensor, keys: list[str], rank: int, seed: int):
    """ATTEMPT multi-task: per task an AttentionComposer (own target prompt) whose projections and LayerNorm
    are one shared set. stack [K, P, H] -> (shared ModuleDict, {task: MixtureSource})."""
    template = AttentionComposer(stack, rank=rank, seed=seed)
    shared = nn.ModuleDict({"down": template.down, "up": template.up, "layer_norm": template.layer_norm})
    out = {}
    for t in keys:
        comp = AttentionComposer(stack, rank=rank, seed=seed)  # target prompt starts at zeros
        comp.down, comp.up, comp.layer_norm = shared["down"], shared["up"], shared["layer_norm"]
        out[t] = MixtureSource(comp)
    return shared, out


# -- setting up -----------------------------------------------------------------------------------
@dataclass
class MultiPrepared:
    backbone: Backbone
    model: MultiTaskModel
    tasks: dict[str, Prepared]
    """Per task key: its spec, data, provenance, and ``model`` = its view of the MultiTaskModel."""
    sources: list[str]
    mpt: object = None
    """--shared mpt: the MPTSetup (composer/mpt.py): the shared prompt, task order, teachers."""


def resolve_tasks(cfg: MultiTaskConfig) -> tuple[list[tuple[str, object, str | None]], object]:
    """-> ([(key, spec, graph prompt name or None)], graph or None). Fails before any model loads."""
    G = None
    if cfg.graph:
        G = G_.check(G_.load_graph(cfg.graph))
        nodes = [(n, d) for n, d in G.nodes(data=True)
                 if cfg.shared != "mpt" or d.get("role") in ("source", "subtask")]  # MPT: the sources only
        if not nodes:
            raise TrainingError(f"--shared mpt trains the source and subtask nodes of graph "
                                f"{G.graph.get('name')!r}, and it has none")
        out = [(str(n), load_task(d.get("task") or n), d.get("prompt")) for n, d in nodes]
    else:
        out = []
        for t in cfg.tasks:
            spec = load_task(t)
            out.append((spec.name, spec, None))
    keys = [k for k, _, _ in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise TrainingError(f"task {dup[0]!r} is listed twice; give each task once")
    return out, G


def _library_entry(library: Library, name: str, backbone: Backbone, what: str):
    """A library prompt that must have been trained on this run's backbone."""
    entry = library.load(name)
    trained_on = entry.meta.get("backbone")
    if trained_on is not None and trained_on != backbone.name:
        raise TrainingError(f"{what}: prompt '{name}' was trained on backbone '{trained_on}', but this "
                            f"multitask run shares one backbone, '{backbone.name}'; retrain the prompt on "
                            f"'{backbone.name}' or train with --model {trained_on}")
    check_compatible(entry.meta, name, backbone.name, backbone.family, backbone.hidden_size)
    return entry


def prepare_multitask(cfg: MultiTaskConfig, backbone: Backbone | None = None,
                      library: Library | None = None) -> MultiPrepared:
    """Load the backbone, every task's data, and build the MultiTaskModel (nothing trains yet)."""
    library = library or Library()
    found, G = resolve_tasks(cfg)
    cfg.backbone = cfg.backbone or (G.graph.get("backbone") if G is not None else None) or "minilm"
    if G is not None and G.graph.get("backbone") not in (None, cfg.backbone):
        log.warning("graph %r is drawn for backbone %r; training its tasks on %r", G.graph.get("name"),
                    G.graph.get("backbone"), cfg.backbone)
    backbone = backbone or load_backbone(cfg.backbone)
    for _, spec, _ in found:  # every head (and prompt length) fits the backbone, before any data loads
        resolve_head(spec, backbone, cfg.head)
        if not cfg.init.startswith("library") and cfg.composer != "attention" and cfg.shared != "mpt":
            check_positions(backbone, spec, cfg.prompt_length)

    sources, shared, mixtures = [], None, {}
    if cfg.composer == "attention":
        sources = list(cfg.sources or [])
        if not sources and G is not None:
            sources = [d["prompt"] for _, d in G.nodes(data=True) if d.get("role") in ("source", "subtask")
                       and d.get("prompt") and library.exists(d["prompt"])]
        if not sources:
            raise TrainingError("--composer attention attends over frozen source prompts, and there are "
                                "none: pass --sources NAME,... or a graph whose source/subtask nodes have "
                                f"prompts in the library at {library.root}")
        entries = [_library_entry(library, s, backbone, "--composer attention") for s in sources]
        stack = torch.stack([e.prompt for e in entries])  # [K, P, H]
        shared, mixtures = _shared_attention(stack, [k for k, _, _ in found], cfg.attention_rank, cfg.seed)
    mpt = None
    if cfg.shared == "mpt":  # one P* and per-task factors, distilled from each task's own prompt (composer/mpt.py)
        from composer.mpt import setup_mpt

        mpt = setup_mpt(cfg, found, backbone, library, lambda n, what: _library_entry(library, n, backbone, what))
        for _, spec, _ in found:
            check_positions(backbone, spec, mpt.mpt.shared.shape[-2])
        sources = list(mpt.teachers.values())

    tok = backbone.tokenizer
    views, preps = {}, {}
    for i, (key, spec, graph_prompt) in enumerate(found):
        splits = load_splits(spec, data_dir=cfg.data_dir, k_shot=cfg.k_shot, seed=cfg.seed)
        train, dev, test = encode_splits(spec, splits, tok)
        if cfg.composer == "attention":
            prompt, prov = mixtures[key], {"init": "attention", "sources": sources}
        elif mpt is not None:
            prompt, prov = mpt.source(key), mpt.provenance(key)
        elif cfg.shared == "mixture" and views:  # every task trains the first task's prompt source itself
            prompt, prov = views[found[0][0]].prompt_source, dict(preps[found[0][0]].provenance)
            check_positions(backbone, spec, prompt.length)
        else:
            init = cfg.init
            if init == "library":
                init = f"library:{graph_prompt or key}"
            if init.startswith("library:"):
                _library_entry(library, init.split(":", 1)[1].split("@")[0], backbone,
                               f"--init {cfg.init} (task {key})")
            prompt, prov = init_prompt(init, cfg.prompt_length, backbone, spec, cfg.seed + i, library, kind=cfg.kind)
        views[key] = build_model(backbone, spec, prompt, head=cfg.head, label_temperature=cfg.label_temperature,
                                 seed=cfg.seed + i, prefix_projection=cfg.prefix_projection)
        prov.update(multitask=[k for k, _, _ in found], temperature=cfg.sampling_temperature, composer=cfg.composer)
        if cfg.shared == "mixture":
            prov["shared"] = "mixture"
        preps[key] = Prepared(backbone, spec, train, dev, test, None, prov)
    if mpt is not None:
        model = build_mpt_model(backbone, mpt, views, {k: p.spec for k, p in preps.items()}, cfg)
    else:
        model = MultiTaskModel(backbone, {k: v.prompt_source for k, v in views.items()},
                               {k: v.head for k, v in views.items()},
                               {k: p.spec.num_labels for k, p in preps.items()}, shared=shared)
    if cfg.adapter == "lora":  # one LoRA on the shared backbone, before the optimizer and any checkpoint load
        settings = add_lora(model.network, cfg.lora_settings())
        for key in preps:  # each task's view saves it beside its prompt (every entry stands alone)
            model.view(key).lora = settings
    for key, p in preps.items():
        p.model = model.view(key)
    return MultiPrepared(backbone, model, preps, sources, mpt)


def _batch(mp: MultiPrepared, keys: list[str], pairs: list[tuple[int, int]],
           pad: int) -> dict[str, torch.Tensor]:
    """(task position, example index) pairs -> one padded batch with labels, task_ids [B] and, when a
    generation task is in the mixture, targets [B, m] (-100 for classification rows)."""
    ids, mask = pad_batch([mp.tasks[keys[t]].train.ids[i] for t, i in pairs], pad)
    labels = torch.stack([mp.tasks[keys[t]].train.labels[i] for t, i in pairs])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "task_ids": torch.tensor([t for t, _ in pairs], dtype=torch.long)}
    if any(mp.tasks[k].train.targets is not None for k in keys):
        targets = [mp.tasks[keys[t]].train.targets for t, _ in pairs]
        out["targets"], _ = pad_batch([tg[i] if tg is not None else [] for tg, (_, i) in zip(targets, pairs)], -100)
    return out


def _save_mixture_entry(library: Library, name: str, core: MultiTaskModel, mp: MultiPrepared, cfg: MultiTaskConfig,
                        metrics: dict) -> None:
    """--shared mixture: the one prompt (no head: each task kept its own) as a library entry with provenance."""
    keys = list(core.tasks)
    view = core.view(keys[0])
    src = view.prompt_source
    meta = {"task": None, "backbone": mp.backbone.name, "family": mp.backbone.family,
            "hidden_size": mp.backbone.hidden_size, "kind": view.kind, "position": view.position, "head": None,
            "metrics": metrics, "config": cfg.to_dict(),
            "provenance": {**mp.tasks[keys[0]].provenance, "shared": "mixture", "tasks": keys}}
    if view.kind == "prefix":
        meta["prefix_heads"] = view.geometry.kv_heads
    library.save(name, src.static(), meta)


# -- the run --------------------------------------------------------------------------------------
def train_multitask(cfg: MultiTaskConfig, library: Library | None = None, progress: bool = True,
                    prepared: MultiPrepared | None = None, resume: str | Path | None = None,
                    accelerator=None) -> dict:
    """Train every task at once, keep each task's best dev checkpoint, save each to the library."""
    # a process whose share of a batch lacks a task leaves that task's prompt unused: DDP must allow it
    acc = accelerator or make_accelerator(cfg.mixed_precision, find_unused_parameters=True)
    library = library or Library()
    torch.manual_seed(cfg.seed)
    if prepared is None:
        found, G = resolve_tasks(cfg)  # fail on a bad task list before the resume check and the model load
        cfg.backbone = cfg.backbone or (G.graph.get("backbone") if G is not None else None) or "minilm"
        keys = [k for k, _, _ in found]
    else:
        keys = list(prepared.model.tasks)
    if cfg.save_prefix:  # every name the run will save, before any work
        for k in keys:
            check_name(f"{cfg.save_prefix}{k}", f"--save-prefix name for task {k!r},")
        if cfg.shared != "none":
            if "shared" in keys:
                raise TrainingError(f"--shared {cfg.shared} saves the shared prompt as {cfg.save_prefix}shared, and a task "
                                    "is named 'shared' too; rename that graph node")
            check_name(f"{cfg.save_prefix}{SHARED}", "--save-prefix name of the shared prompt,")
        if acc.is_main_process:
            library.check_writable()
    run_dir = Path(resume) if resume else Path(cfg.run_dir) if cfg.run_dir else Path("runs") / (
        f"{cfg.save_prefix or 'multitask-'}{time.strftime('%Y%m%d-%H%M%S')}")
    if resume:
        check_resume(run_dir, cfg, ("tasks", "graph", "backbone", "mode", "composer")
                     + (("shared",) if cfg.shared != "none" else ()))  # runs before --shared have none
    cfg.run_dir = str(run_dir)
    run = RunFolder(run_dir, acc)
    with run.owned(bool(resume)):  # one process per run folder: a second run there refuses
        return _train_multitask(cfg, run, library, progress, prepared, resume, acc)


def _train_multitask(cfg: MultiTaskConfig, run: RunFolder, library: Library, progress: bool,
                     prepared: MultiPrepared | None, resume, acc) -> dict:
    """The run itself, in a folder this process owns."""
    run_dir = run.path
    mp = prepared or prepare_multitask(cfg, library=library)
    keys = list(mp.model.tasks)
    opt = Optimizer(cfg, mp.model)
    state = {"step": 0, "best": {}, "best_step": {}, "bad_evals": 0, "tasks": keys, "model": cfg.backbone,
             "mode": cfg.mode, "composer": cfg.composer}
    mixture = cfg.shared == "mixture"  # one prompt for all: its own best, by the mean dev score over the tasks
    state = run.open(cfg, bool(resume), [run.best / k for k in keys] + ([run.best / SHARED] if mixture else []),
                     mp.model, opt, state)
    if state.get("tasks") != keys:
        raise TrainingError(f"--resume {run_dir}: that run trained tasks {state.get('tasks')}, this one "
                            f"{keys}; resume with the same graph or task list")
    model, opt.optimizer = acc.prepare(mp.model, opt.optimizer)
    core = acc.unwrap_model(model)
    devs = {k: mp.tasks[k].dev.subset(cfg.max_eval, cfg.seed) for k in keys}
    plan = MixturePlan([len(mp.tasks[k].train) for k in keys], cfg.batch_size, cfg.seed, cfg.sampling_temperature)
    pad = mp.backbone.tokenizer.pad_token_id
    every_ckpt = cfg.checkpoint_every or cfg.eval_every

    def do_eval(step: int) -> dict[str, dict]:
        r = {k: evaluate(core.view(k), mp.tasks[k].spec, devs[k], cfg.eval_batch_size, acc.device,
                         acc.autocast) for k in keys}
        run.log({"step": step, "eval": r, "mean": sum(x["score"] for x in r.values()) / len(r)})
        state["last_eval"] = {"step": step, "scores": {k: x["score"] for k, x in r.items()}}  # MPT's entry: its state
        return r

    def save_best(tasks: list[str], r: dict[str, dict], step: int) -> None:
        """best/TASK/: the whole trainable state now, for each task that just reached its best (and, for
        --shared mixture, best/shared/ when the mean dev score over the tasks did)."""
        mean = sum(x["score"] for x in r.values()) / len(r)
        shared_best = mixture and mean > state.get("best_mean", float("-inf"))
        if shared_best:
            state.update(best_mean=mean, best_mean_step=step, best_mean_scores={k: x["score"] for k, x in r.items()})
        if (tasks or shared_best) and acc.is_main_process:
            snap = trainable_state(core)
            for k in tasks + ([SHARED] if shared_best else []):
                save_trainable(run.best / k, snap)

    bar = progress_bar(f"multitask {len(keys)} tasks", cfg.steps, initial=state["step"]) \
        if progress and acc.is_main_process else None
    if state["step"] == 0 and not state["best"]:
        # the init is a candidate like any checkpoint (as in train.py): a library prompt may already be best
        r0 = do_eval(0)
        state.update(initial=r0, best={k: r0[k]["score"] for k in keys}, best_step={k: 0 for k in keys})
        save_best(keys, r0, 0)
    model.train()
    t0, step = time.time(), state["step"]
    with run.interruptible(core, opt, state, bar):
        while step < cfg.steps:
            b = _batch(mp, keys, shard(plan.indices(step), acc.process_index, acc.num_processes), pad)
            seed_step(cfg.seed, step, acc.device)
            with acc.autocast():
                per_row = model(b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device),
                                b["task_ids"].to(acc.device), labels=b["labels"].to(acc.device),
                                targets=b["targets"].to(acc.device) if "targets" in b else None)  # [B]
                loss = per_row.float().mean()
            training_step(acc, loss, opt, cfg.max_grad_norm, step, run, cfg.lr)
            step += 1
            state["step"] = step
            if step % 10 == 0 or step == cfg.steps:
                task_ids = b["task_ids"].to(per_row.device)
                # per task on the main process's share of the batch; "loss" is the global batch's
                task_loss = {keys[t]: round(per_row[task_ids == t].mean().item(), 6)
                             for t in task_ids.unique().tolist()}
                mean_loss = acc.reduce(loss.detach(), reduction="mean")  # over processes
                rec = {"step": step, "loss": round(mean_loss.item(), 6), "task_loss": task_loss, "lr": opt.lr}
                if getattr(core, "last_distill", None):  # --shared mpt: the batch's mean KL and MSE to the teachers
                    rec["distill"] = core.last_distill
                run.log(rec)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = do_eval(step)
                improved = [k for k in keys if k not in state["best"] or r[k]["score"] > state["best"][k]]
                for k in improved:
                    state["best"][k], state["best_step"][k] = r[k]["score"], step
                save_best(improved, r, step)
                state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
                if out_of_patience(state, cfg.patience, step):  # no task gained
                    break
            if step % every_ckpt == 0 or step == cfg.steps:
                run.save_checkpoint(core, opt, state)
    acc.wait_for_everyone()
    final = trainable_state(core) if mp.mpt is not None else None  # the shared entry is the run's last state

    result = {"tasks": keys, "model": cfg.backbone, "steps": step, "seconds": round(time.time() - t0, 2),
              "run_dir": str(run_dir), "temperature": cfg.sampling_temperature, "composer": cfg.composer,
              "sizes": dict(zip(keys, plan.sizes)), "probabilities": dict(zip(keys, plan.probs.tolist())),
              "per_task": {}}
    if mp.sources:
        result["sources"] = mp.sources
    for k in keys:  # each task from its own best snapshot
        snap = run.best / k / "trainable.safetensors"
        if snap.exists():
            load_trainable(core, load_file(str(snap)))
        prep, view = mp.tasks[k], core.view(k)
        r = {"best_step": state["best_step"].get(k), "metric": prep.spec.metric,
             "initial": (state.get("initial") or {}).get(k),
             "dev": evaluate(view, prep.spec, prep.dev.subset(cfg.max_test, cfg.seed), cfg.eval_batch_size,
                                acc.device, acc.autocast)}
        if prep.test is not None:
            r["test"] = evaluate(view, prep.spec, prep.test.subset(cfg.max_test, cfg.seed), cfg.eval_batch_size,
                                 acc.device, acc.autocast)
        if cfg.save_prefix and acc.is_main_process:
            name = f"{cfg.save_prefix}{k}"
            try:
                save_to_library(library, name, view, prep, cfg, r)
            except (ComposerError, OSError) as e:  # the training is not lost: the run folder holds it whole
                result["per_task"][k] = r
                run.write_result(result)
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise TrainingError(f"trained, but could not save '{name}' ({why}); the run is whole in {run_dir}: "
                                    f"save every task with `prompt-composer train --resume {run_dir} --save-prefix "
                                    "PREFIX`") from None
            r["saved"] = name
        result["per_task"][k] = r
    result["mean_dev"] = sum(r["dev"]["score"] for r in result["per_task"].values()) / len(keys)
    initial = {k: x["score"] for k, x in (state.get("initial") or {}).items()}  # the shared entries' step-0 scores
    if mixture:
        result.update(shared_best_step=state.get("best_mean_step"), shared_best_mean=state.get("best_mean"))
        if cfg.save_prefix and acc.is_main_process:
            load_trainable(core, load_file(str(run.best / SHARED / "trainable.safetensors")))
            name = f"{cfg.save_prefix}{SHARED}"
            _save_mixture_entry(library, name, core, mp, cfg, {"dev_mean": state.get("best_mean"),
                                                              "dev": state.get("best_mean_scores"),
                                                              "initial": initial,
                                                              "best_step": state.get("best_mean_step"),
                                                              "steps": step})
            result["shared_saved"] = name
    if final is not None and cfg.save_prefix and acc.is_main_process:
        load_trainable(core, final)
        name = f"{cfg.save_prefix}{SHARED}"
        last = state.get("last_eval") or {}
        # the entry is the last state: its per-task dev scores are the last evaluation's, where that was at this step
        save_mpt_entry(library, name, core, mp.backbone, cfg, mp.mpt,
                       {"steps": step, "initial": initial or None,
                        "dev": last.get("scores") if last.get("step") == step else None})
        result["shared_saved"] = name
    run.write_result(result)
    return result
