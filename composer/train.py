"""Single-task training (accelerate): prompt tuning, and joint prompt + model tuning.

The loop is visible top to bottom in ``train``; what it shares with multitask.py (the optimizer, one training
step, the run folder, the split choice) is in composer/loop.py. What makes it safe to kill:
- the batch at step s is a pure function of (seed, s): indices come from per-epoch permutations
  seeded by (seed, epoch), and the dropout RNG is reseeded from (seed, s) each step, so a resumed
  run sees exactly the batches and dropout masks an uninterrupted run would;
- a checkpoint (trainable tensors as safetensors, optimizer/scheduler state, step, best score) is
  written into a temporary folder and renamed over the previous one, so a crash or a full disk
  mid-write leaves the previous checkpoint whole (both in composer/runstate.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from composer.attention import distill_over
from composer.backbones import Backbone, load_backbone
from composer.config import TrainConfig
from composer.encoding import Encoded
from composer.errors import ComposerError, TrainingError
from composer.evaluate import evaluate, write_predictions
from composer.heads import resolve_head
from composer.library import Library
from composer.lora import add_lora, lora_state
from composer.loop import (Optimizer, RunFolder, backbone_filter, check_resume, encode_splits, make_accelerator,
                           out_of_patience, seed_step, training_step)
from composer.model import build_model, check_positions
from composer.prompts import init_prompt
from composer.runstate import BatchPlan, load_trainable, progress_bar, save_trainable, shard, trainable_state
from composer.taskdata import load_splits
from composer.tasks import load_task

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Prepared", "prepare", "train", "save_to_library", "default_run_dir"]


@dataclass
class Prepared:
    """What a run needs besides the config: the backbone, the task, its data, the model."""

    backbone: Backbone
    spec: object
    train: Encoded
    dev: Encoded
    test: Encoded | None
    model: object
    """The PromptedModel."""
    provenance: dict = field(default_factory=dict)


def default_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.save or f"{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


def prepare(cfg: TrainConfig, backbone: Backbone | None = None, library: Library | None = None,
            prompt_source=None) -> Prepared:
    """Load backbone, task and data, and build the prompted model (nothing trains yet)."""
    spec = load_task(cfg.task)
    backbone = backbone or load_backbone(cfg.backbone)
    resolve_head(spec, backbone, cfg.head)  # fail before touching data
    if not cfg.init.startswith("library"):  # a library init brings its own length (checked when it loads)
        check_positions(backbone, spec, cfg.prompt_length)
    splits = load_splits(spec, data_dir=cfg.data_dir, k_shot=cfg.k_shot, seed=cfg.seed)
    train, dev, test = encode_splits(spec, splits, backbone.tokenizer)
    if prompt_source is not None:
        prompt, prov = prompt_source, {"init": "module"}
    else:
        prompt, prov = init_prompt(cfg.init, cfg.prompt_length, backbone, spec, cfg.seed, library, kind=cfg.kind)
    pm = build_model(backbone, spec, prompt, head=cfg.head, label_temperature=cfg.label_temperature, seed=cfg.seed,
                     prefix_projection=cfg.prefix_projection, position=cfg.prompt_position)
    if cfg.adapter == "lora":  # before the optimizer and any checkpoint load: they see the LoRA weights
        pm.lora = add_lora(pm.network, cfg.lora_settings())
    return Prepared(backbone, spec, train, dev, test, pm, prov)


def train(cfg: TrainConfig, prepared: Prepared | None = None, resume: str | Path | None = None,
          library: Library | None = None, progress: bool = True, accelerator=None) -> dict:
    """Train, keep the best dev checkpoint, optionally save to the library. -> a result dict."""
    # joint mode trains backbone weights no head reads (BERT's pooler): DDP must allow unused parameters
    acc = accelerator or make_accelerator(cfg.mixed_precision, find_unused_parameters=cfg.mode == "joint")
    torch.manual_seed(cfg.seed)
    run_dir = Path(resume) if resume else Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if resume:
        check_resume(run_dir, cfg, ("task", "backbone", "mode"))
    cfg.run_dir = str(run_dir)
    if cfg.save and acc.is_main_process:
        library = library or Library()
        library.check_writable()  # now, not after the training
    run = RunFolder(run_dir, acc)
    with run.owned(bool(resume)):  # one process per run folder: a second run of the same --save refuses
        return _train(cfg, run, prepared, resume, library, progress, acc)


def _train(cfg: TrainConfig, run: RunFolder, prepared: Prepared | None, resume, library: Library | None,
           progress: bool, acc) -> dict:
    """The run itself, in a folder this process owns."""
    run_dir = run.path
    prep = prepared or prepare(cfg, library=library)
    opt = Optimizer(cfg, prep.model)
    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "task": prep.spec.name,
             "model": cfg.backbone, "mode": cfg.mode}
    state = run.open(cfg, bool(resume), [run.best], prep.model, opt, state)
    model, opt.optimizer = acc.prepare(prep.model, opt.optimizer)
    core = acc.unwrap_model(model)
    dev = prep.dev.subset(cfg.max_eval, cfg.seed)
    plan = BatchPlan(len(prep.train), cfg.batch_size, cfg.seed)
    pad = prep.backbone.tokenizer.pad_token_id
    every_ckpt = cfg.checkpoint_every or cfg.eval_every

    def do_eval(step: int) -> dict:
        r = evaluate(core, prep.spec, dev, cfg.eval_batch_size, acc.device, acc.autocast)
        run.log({"step": step, "eval": r})
        return r

    def save_best() -> None:
        if acc.is_main_process:
            save_trainable(run.best, trainable_state(core))

    bar = progress_bar(f"train {prep.spec.name}", cfg.steps, initial=state["step"]) \
        if progress and acc.is_main_process else None
    if state["step"] == 0 and state["best"] is None:
        # the init is a candidate like any checkpoint: a composed prompt may already beat what tuning reaches
        r0 = do_eval(0)
        state.update(initial=r0, best=r0["score"], best_step=0)
        save_best()
    model.train()
    t0, step = time.time(), state["step"]
    with run.interruptible(core, opt, state, bar):
        while step < cfg.steps:
            b = prep.train.batch(shard(plan.indices(step), acc.process_index, acc.num_processes), pad)
            seed_step(cfg.seed, step, acc.device)
            with acc.autocast():
                ids, mask = b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device)
                if "targets" in b:  # a generation task: the NLL of the target's tokens
                    loss = model(ids, mask, targets=b["targets"].to(acc.device)).float().mean()
                else:
                    loss = F.cross_entropy(model(ids, mask).float(), b["labels"].to(acc.device))  # logits [B, C]
            training_step(acc, loss, opt, cfg.max_grad_norm, step, run, cfg.lr)
            step += 1
            state["step"] = step
            if step % 10 == 0 or step == cfg.steps:
                mean_loss = acc.reduce(loss.detach(), reduction="mean")  # the global batch's, not rank 0's share
                run.log({"step": step, "loss": round(mean_loss.item(), 6), "lr": opt.lr})
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", best=state["best"] if state["best"] is None
                                else f"{state['best']:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = do_eval(step)
                if state["best"] is None or r["score"] > state["best"]:
                    state.update(best=r["score"], best_step=step, bad_evals=0)
                    save_best()
                else:
                    state["bad_evals"] += 1
                if out_of_patience(state, cfg.patience, step):
                    break
            if step % every_ckpt == 0 or step == cfg.steps:
                run.save_checkpoint(core, opt, state)
    acc.wait_for_everyone()
    if (run.best / "trainable.safetensors").exists():
        load_trainable(core, load_file(str(run.best / "trainable.safetensors")))
    result = {"task": prep.spec.name, "model": cfg.backbone, "steps": step, "best_step": state["best_step"],
              "seconds": round(time.time() - t0, 2), "run_dir": str(run_dir), "metric": prep.spec.metric,
              "initial": state.get("initial"), "best": state["best"],  # both on the same dev subset (max_eval)
              "dev": evaluate(core, prep.spec, prep.dev.subset(cfg.max_test, cfg.seed), cfg.eval_batch_size,
                              acc.device, acc.autocast)}
    if prep.test is not None:
        result["test"] = evaluate(core, prep.spec, prep.test.subset(cfg.max_test, cfg.seed), cfg.eval_batch_size,
                                  acc.device, acc.autocast, keep_predictions=prep.spec.is_generation)
        if "predictions" in result["test"] and acc.is_main_process:  # the generations, for a reader to read
            write_predictions(run_dir / "predictions-test.jsonl", result["test"].pop("predictions"))
            result["test"]["predictions"] = str(run_dir / "predictions-test.jsonl")
    if cfg.save and acc.is_main_process:
        try:
            save_to_library(library or Library(), cfg.save, core, prep, cfg, result)
        except (ComposerError, OSError) as e:  # the training is not lost: the run folder holds it whole
            run.write_result(result)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainingError(f"trained, but could not save '{cfg.save}' ({why}); the run is whole in {run_dir}: "
                                f"save it with `prompt-composer train --resume {run_dir} --save NAME`") from None
        result["saved"] = cfg.save
    run.write_result(result)
    return result


def save_to_library(library: Library, name: str, pm, prep: Prepared, cfg, result: dict):
    """The trained prompt (+ head weights, + changed backbone weights in joint mode) as a library entry.

    ``pm`` is the PromptedModel (a multitask run passes each task's view); ``cfg`` the run's config."""
    src = pm.prompt_source
    if hasattr(src, "composer"):  # a mixture: its static prompt is the mean mixed prompt over training inputs
        distill_over(pm, prep.train)
        prep.provenance["strategy"] = "attention"
    static = src.static() if hasattr(src, "static") else None
    extras = {}
    head_state = {k: v for k, v in pm.head.state_dict().items() if k.startswith("proj.")}
    if head_state:
        extras["head"] = head_state
    if hasattr(src, "state_for_save"):
        tensors, conf = src.state_for_save()
        extras["composer"] = tensors
        prep.provenance["composer_config"] = conf
    lora = getattr(pm, "lora", None)
    if lora:
        extras["lora"] = lora_state(pm.network)
    elif cfg.mode == "joint":
        keep = backbone_filter(cfg.unfreeze, prep.backbone.num_layers)
        delta = {n: p.detach() for n, p in pm.network.named_parameters() if keep(n)}
        if delta:
            extras["backbone"] = delta
    if static is None:
        raise ComposerError("this prompt source has no static prompt to save")
    meta = {"task": prep.spec.name, "backbone": prep.backbone.name, "family": prep.backbone.family,
            "hidden_size": prep.backbone.hidden_size, "kind": pm.kind, "position": pm.position, "head": pm.head.kind, "metrics": {k: result[k] for k in ("initial", "dev", "test") if result.get(k) is not None},
            "config": cfg.to_dict(), "provenance": prep.provenance}
    if lora:
        meta["lora"] = lora
    if pm.kind == "prefix":
        meta["prefix_heads"] = pm.geometry.kv_heads  # what a PEFT PrefixTuning export needs to say
    return library.save(name, static, meta, extras=extras)
