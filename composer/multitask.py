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

The loop is train.py's (accelerate; the same checkpoints and schedule from runstate.py, the same parameter
groups): per-task evaluation on each task's dev subset every ``eval_every`` steps, a best checkpoint per
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

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from composer import graph as G_
from composer.atomic import atomic_write_text
from composer.attention import AttentionComposer
from composer.backbones import Backbone, load_backbone
from composer.build import build_model, encode_split, init_prompt, resolve_head
from composer.encoding import pad_batch
from composer.errors import TrainingError
from composer.evaluate import evaluate
from composer.library import Library, check_compatible
from composer.model import MultiTaskModel, attention_kernels, set_activation_checkpointing
from composer.runstate import (
    MixturePlan,
    load_checkpoint,
    progress_bar,
    load_trainable,
    lr_lambda,
    recover_dir,
    save_checkpoint,
    save_trainable,
    shard,
    trainable_state,
)
from composer.train import (Prepared, TrainConfig, TuningConfig, _param_groups, _subset, make_accelerator,
                            save_to_library)

log = logging.getLogger(__name__)

COMPOSERS = ("none", "attention")


@dataclass(kw_only=True)
class MultiTaskConfig(TuningConfig):
    """Everything that defines a multi-task run; saved as config.json in the run folder.

    The settings it shares with a single-task run are TuningConfig's (composer/train.py); these are its own,
    and the shared ones whose defaults differ (more steps, larger mixed batches, rarer and smaller evals)."""

    tasks: list[str] | None = None
    """Task spec names or YAML paths (a comma-separated string is split). Give this or ``graph``."""
    graph: str | None = None
    """A task graph: every node's task trains (the node name is the task's key)."""
    model: str | None = None
    """Backbone alias, path or hub id; None = the graph's backbone, else minilm."""
    head: str | None = None
    """One head for every task; None = each task's own (its spec's head, else the family default)."""
    init: str = "random"
    """random | vocab | text | library (each task from its graph node's prompt, else the entry named like the
    task) | library:NAME (every task from one entry). Per-task random inits use seed + task position."""
    composer: str = "none"
    """none: one soft prompt per task; attention: ATTEMPT's shared attention over frozen source prompts."""
    sources: list[str] | None = None
    """attention: library prompts to attend over; None = the graph's source and subtask node prompts."""
    attention_rank: int = 32
    """attention: size of the shared down-projection."""
    steps: int = 1000
    batch_size: int = 32
    """Global batch size, mixed over tasks (split over processes under accelerate launch)."""
    temperature: float = 1.0
    """Sampling temperature T: task i is drawn with probability proportional to n_i ** (1 / T)."""
    eval_every: int = 100
    max_eval: int | None = 500
    """Evaluate each task on at most this many dev examples during training (a fixed, seeded subset)."""
    save_prefix: str | None = None
    """Save each task's best prompt to the library as f"{save_prefix}{task}" (None = do not save)."""

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if isinstance(self.sources, str):
            self.sources = [s.strip() for s in self.sources.split(",") if s.strip()]
        if bool(self.tasks) == bool(self.graph):
            raise TrainingError("multitask training needs either --tasks a,b,... or --graph G (not both, not "
                                f"neither); got tasks={self.tasks!r}, graph={self.graph!r}")
        if not self.temperature > 0:  # also NaN
            raise TrainingError(f"--temperature must be > 0 (task i is sampled in proportion to "
                                f"n_i ** (1/T)), got {self.temperature}; use 1 to sample by size, a large "
                                "value for uniform")
        if self.composer not in COMPOSERS:
            raise TrainingError(f"unknown --composer {self.composer!r}: use one of {', '.join(COMPOSERS)}")
        if self.composer == "attention" and self.init != "random":
            raise TrainingError(f"--init {self.init} does not apply with --composer attention: each task's "
                                "target prompt starts at zeros (its first prompt is the mixture of the "
                                "sources); drop --init")
        if self.attention_rank < 1:
            raise TrainingError(f"--attention-rank must be >= 1, got {self.attention_rank}")
        super().__post_init__()  # the checks every run makes (steps, lr, mode, unfreeze, ...)

    def task_config(self, task: str) -> TrainConfig:
        """The single-task view of this config (what train.py's helpers read)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TuningConfig)}
        return TrainConfig(**dict(shared, model=self.model or "minilm"), task=task)


def _shared_attention(stack: torch.Tensor, keys: list[str], rank: int, seed: int):
    """ATTEMPT multi-task: per task an AttentionComposer (own target prompt) whose projections and LayerNorm
    are one shared set. stack [K, P, H] -> (shared ModuleDict, {task: MixtureSource})."""
    from composer.compose import MixtureSource

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


def resolve_tasks(cfg: MultiTaskConfig) -> tuple[list[tuple[str, object, str | None]], object]:
    """-> ([(key, spec, graph prompt name or None)], graph or None). Fails before any model loads."""
    from composer.tasks import load_task

    G = None
    if cfg.graph:
        G = G_.check(G_.load_graph(cfg.graph))
        out = [(str(n), load_task(d.get("task") or n), d.get("prompt")) for n, d in G.nodes(data=True)]
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
    from composer.taskdata import load_splits

    library = library or Library()
    found, G = resolve_tasks(cfg)
    cfg.model = cfg.model or (G.graph.get("backbone") if G is not None else None) or "minilm"
    if G is not None and G.graph.get("backbone") not in (None, cfg.model):
        log.warning("graph %r is drawn for backbone %r; training its tasks on %r", G.graph.get("name"),
                    G.graph.get("backbone"), cfg.model)
    backbone = backbone or load_backbone(cfg.model)
    for _, spec, _ in found:  # every head fits the backbone, before any data loads
        resolve_head(spec, backbone, cfg.head)

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

    tok = backbone.tokenizer
    views, preps = {}, {}
    for i, (key, spec, graph_prompt) in enumerate(found):
        splits = load_splits(spec, data_dir=cfg.data_dir, k_shot=cfg.k_shot, seed=cfg.seed)
        if "train" not in splits:
            raise TrainingError(f"task '{spec.name}' has no train split")
        dev_split = "dev" if "dev" in splits else "test"
        train = encode_split(spec, splits["train"], tok)
        dev = encode_split(spec, splits[dev_split], tok)
        test = encode_split(spec, splits["test"], tok) if "test" in splits and dev_split != "test" else None
        if cfg.composer == "attention":
            prompt, prov = mixtures[key], {"init": "attention", "sources": sources}
        else:
            init = cfg.init
            if init == "library":
                init = f"library:{graph_prompt or key}"
            if init.startswith("library:"):
                _library_entry(library, init.split(":", 1)[1], backbone, f"--init {cfg.init} (task {key})")
            prompt, prov = init_prompt(init, cfg.prompt_length, backbone, spec, cfg.seed + i, library)
        views[key] = build_model(backbone, spec, prompt, head=cfg.head, temperature=cfg.label_temperature,
                                 seed=cfg.seed + i)
        prov.update(multitask=[k for k, _, _ in found], temperature=cfg.temperature, composer=cfg.composer)
        preps[key] = Prepared(backbone, spec, train, dev, test, None, prov)
    model = MultiTaskModel(backbone, {k: v.prompt_source for k, v in views.items()},
                           {k: v.head for k, v in views.items()},
                           {k: p.spec.num_labels for k, p in preps.items()}, shared=shared)
    for key, p in preps.items():
        p.model = model.view(key)
    return MultiPrepared(backbone, model, preps, sources)


def _check_resume(run_dir: Path, cfg: MultiTaskConfig) -> None:
    cfile = run_dir / "config.json"
    if not cfile.exists():
        raise TrainingError(f"--resume {run_dir}: no config.json there; is it a run folder?")
    old = json.loads(cfile.read_text())
    if "tasks" not in old:
        raise TrainingError(f"--resume {run_dir}: that is a single-task run ('{old.get('task')}'); resume it "
                            "with `prompt-composer train` or start a new multitask run")
    for key in ("tasks", "graph", "model", "mode", "composer"):
        if old.get(key) != getattr(cfg, key):
            raise TrainingError(f"--resume {run_dir}: that run has {key} {old.get(key)!r}, this one "
                                f"{getattr(cfg, key)!r}; resume with the same settings or start a new run")


def _batch(mp: MultiPrepared, keys: list[str], pairs: list[tuple[int, int]],
           pad: int) -> dict[str, torch.Tensor]:
    """(task position, example index) pairs -> one padded batch with labels and task_ids [B]."""
    ids, mask = pad_batch([mp.tasks[keys[t]].train.ids[i] for t, i in pairs], pad)
    labels = torch.stack([mp.tasks[keys[t]].train.labels[i] for t, i in pairs])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "task_ids": torch.tensor([t for t, _ in pairs], dtype=torch.long)}


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
        _, G = resolve_tasks(cfg)  # fail on a bad task list before the resume check and the model load
        cfg.model = cfg.model or (G.graph.get("backbone") if G is not None else None) or "minilm"
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / (
        f"{cfg.save_prefix or 'multitask-'}{time.strftime('%Y%m%d-%H%M%S')}")
    if resume:
        run_dir = Path(resume)
        _check_resume(run_dir, cfg)
    cfg.run_dir = str(run_dir)
    mp = prepared or prepare_multitask(cfg, library=library)
    model, keys = mp.model, list(mp.model.tasks)
    tcfg = cfg.task_config("multitask")
    optimizer = torch.optim.AdamW(_param_groups(tcfg, model))
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model.backbone, True)
    warmup = int(cfg.warmup * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, cfg.steps))
    state = {"step": 0, "best": {}, "best_step": {}, "bad_evals": 0, "tasks": keys, "model": cfg.model,
             "mode": cfg.mode, "composer": cfg.composer}
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    ckpt, best_dir = run_dir / "checkpoint", run_dir / "best"
    if resume and acc.is_main_process:
        for d in [ckpt] + [best_dir / k for k in keys]:
            recover_dir(d)
    acc.wait_for_everyone()
    if resume and (ckpt / "state.json").exists():
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        if state.get("tasks") != keys:
            raise TrainingError(f"--resume {run_dir}: that run trained tasks {state.get('tasks')}, this one "
                                f"{keys}; resume with the same graph or task list")
        log.info("resuming %s at step %d", run_dir, state["step"])
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    devs = {k: _subset(mp.tasks[k].dev, cfg.max_eval, cfg.seed) for k in keys}
    plan = MixturePlan([len(mp.tasks[k].train) for k in keys], cfg.batch_size, cfg.seed, cfg.temperature)
    pad = mp.backbone.tokenizer.pad_token_id
    every_ckpt = cfg.checkpoint_every or cfg.eval_every

    def log_line(rec: dict):
        if acc.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def do_eval(step: int) -> dict[str, dict]:
        r = {k: evaluate(core.view(k), mp.tasks[k].spec, devs[k], cfg.eval_batch_size, acc.device,
                         acc.autocast) for k in keys}
        log_line({"step": step, "eval": r, "mean": sum(x["score"] for x in r.values()) / len(r)})
        return r

    def save_best(tasks: list[str]):
        """best/TASK/: the whole trainable state now, for each task that just reached its best."""
        if tasks and acc.is_main_process:
            snap = trainable_state(core)
            for k in tasks:
                save_trainable(best_dir / k, snap)

    bar = None
    if progress and acc.is_main_process:
        bar = progress_bar(f"multitask {len(keys)} tasks", cfg.steps, initial=state["step"])
    if state["step"] == 0 and not state["best"]:
        # the init is a candidate like any checkpoint (as in train.py): a library prompt may already be best
        r0 = do_eval(0)
        state.update(initial=r0, best={k: r0[k]["score"] for k in keys}, best_step={k: 0 for k in keys})
        save_best(keys)
    model.train()
    t0, step = time.time(), state["step"]
    try:
        while step < cfg.steps:
            b = _batch(mp, keys, shard(plan.indices(step), acc.process_index, acc.num_processes), pad)
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks: a function of the step
            with acc.autocast():
                logits = model(b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device),
                               b["task_ids"].to(acc.device))  # [B, C]
                per_row = F.cross_entropy(logits.float(), b["labels"].to(acc.device), reduction="none")  # [B]
                loss = per_row.mean()
            finite = torch.isfinite(loss.detach()).float().view(1)
            if acc.num_processes > 1:  # every process stops together, or the others hang in backward
                finite = acc.gather(finite).min()
            if not finite.item():
                raise TrainingError(f"loss became {loss.item()} at step {step}; the last good checkpoint is "
                                    f"in {ckpt} (lower --lr, currently {cfg.lr})")
            with attention_kernels(acc.device):
                acc.backward(loss)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            if step % 10 == 0 or step == cfg.steps:
                task_ids = b["task_ids"].to(per_row.device)
                # per task on the main process's share of the batch; "loss" is the global batch's
                task_loss = {keys[t]: round(per_row[task_ids == t].mean().item(), 6)
                             for t in task_ids.unique().tolist()}
                mean_loss = acc.reduce(loss.detach(), reduction="mean")  # over processes
                log_line({"step": step, "loss": round(mean_loss.item(), 6), "task_loss": task_loss,
                          "lr": scheduler.get_last_lr()[0]})
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = do_eval(step)
                improved = [k for k in keys if k not in state["best"] or r[k]["score"] > state["best"][k]]
                for k in improved:
                    state["best"][k], state["best_step"][k] = r[k]["score"], step
                save_best(improved)
                state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    log.info("early stop at step %d (no task gained in %d evaluations)", step, cfg.patience)
                    state["stopped_early"] = True
                    break
            if (step % every_ckpt == 0 or step == cfg.steps) and acc.is_main_process:
                save_checkpoint(ckpt, core, optimizer, scheduler, state)
    except KeyboardInterrupt:
        if acc.is_main_process and step > 0:
            save_checkpoint(ckpt, core, optimizer, scheduler, state)
        raise TrainingError(f"interrupted at step {step}; continue with --resume {run_dir}") from None
    finally:
        if bar:
            bar.close()
    acc.wait_for_everyone()

    result = {"tasks": keys, "model": cfg.model, "steps": step, "seconds": round(time.time() - t0, 2),
              "run_dir": str(run_dir), "temperature": cfg.temperature, "composer": cfg.composer,
              "sizes": dict(zip(keys, plan.sizes)), "probabilities": dict(zip(keys, plan.probs.tolist())),
              "per_task": {}}
    if mp.sources:
        result["sources"] = mp.sources
    for k in keys:  # each task from its own best snapshot
        snap = best_dir / k / "trainable.safetensors"
        if snap.exists():
            load_trainable(core, load_file(str(snap)))
        prep, view = mp.tasks[k], core.view(k)
        r = {"best_step": state["best_step"].get(k), "metric": prep.spec.metric,
             "initial": (state.get("initial") or {}).get(k),
             "dev": evaluate(view, prep.spec, prep.dev, cfg.eval_batch_size, acc.device, acc.autocast)}
        if prep.test is not None:
            r["test"] = evaluate(view, prep.spec, prep.test, cfg.eval_batch_size, acc.device, acc.autocast)
        if cfg.save_prefix and acc.is_main_process:
            name = f"{cfg.save_prefix}{k}"
            save_to_library(library, name, view, prep, cfg, r)
            r["saved"] = name
        result["per_task"][k] = r
    result["mean_dev"] = sum(r["dev"]["score"] for r in result["per_task"].values()) / len(keys)
    if acc.is_main_process:
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2, sort_keys=True))
    return result
