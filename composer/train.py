"""One training loop (accelerate) for prompt tuning and joint prompt + model tuning.

The loop is visible top to bottom in ``train``. What makes it safe to kill:
- the batch at step s is a pure function of (seed, s): indices come from per-epoch permutations
  seeded by (seed, epoch), and the dropout RNG is reseeded from (seed, s) each step, so a resumed
  run sees exactly the batches and dropout masks an uninterrupted run would;
- a checkpoint (trainable tensors as safetensors, optimizer/scheduler state, step, best score) is
  written into a temporary folder and renamed over the previous one, so a crash or a full disk
  mid-write leaves the previous checkpoint whole (both in composer/runstate.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from composer.atomic import atomic_write_text
from composer.backbones import Backbone, load_backbone
from composer.build import Encoded, build_model, encode_split, freeze_backbone, init_prompt, resolve_head
from composer.errors import ComposerError, TrainingError
from composer.evaluate import evaluate
from composer.library import Library
from composer.model import attention_kernels, set_activation_checkpointing
from composer.runstate import (
    BatchPlan,
    load_checkpoint,
    load_trainable,
    lr_lambda,
    progress_bar,
    recover_dir,
    save_checkpoint,
    save_trainable,
    shard,
    trainable_state,
)

log = logging.getLogger(__name__)

MODES = ("prompt", "joint")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(kw_only=True)
class TuningConfig:
    """The settings single-task (TrainConfig) and multi-task (MultiTaskConfig) runs share; each sets its defaults."""

    model: str | None = "minilm"
    """Backbone alias, local path or hub id."""
    head: str | None = None
    """verbalizer | label-similarity | mlm | linear; None = the default for the backbone (see build.resolve_head)."""
    prompt_length: int = 20
    """P, the number of virtual tokens (ignored for library inits, which bring their own)."""
    init: str = "random"
    """random | vocab | text | text:WORDS | library:NAME."""
    mode: str = "prompt"
    """prompt: only prompt (and head) train; joint: the backbone parts chosen by ``unfreeze`` train too."""
    unfreeze: str = "all"
    """joint mode: all | last:N | bias | none."""
    steps: int = 300
    batch_size: int = 16
    """Global batch size (split over processes under accelerate launch)."""
    lr: float = 0.3
    """Learning rate of the prompt (and composer, head)."""
    model_lr: float = 2e-5
    """Learning rate of the backbone in joint mode."""
    weight_decay: float = 0.0
    warmup: float = 0.06
    """Fraction of steps of linear warm-up."""
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_batch_size: int = 64
    max_eval: int | None = 1000
    """Evaluate on at most this many dev examples during training (a fixed, seeded subset)."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0 = never)."""
    checkpoint_every: int | None = None
    """Steps between checkpoints (default: eval_every)."""
    seed: int = 0
    k_shot: int | None = None
    """Sample k training examples per class (seeded)."""
    data_dir: str | None = None
    label_temperature: float = 0.05
    """Temperature of the label-similarity head (cosine / T)."""
    mixed_precision: str = "no"
    """no | bf16 | fp16 (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in backward (less memory); the prompt keeps its gradient."""
    run_dir: str | None = None

    def __post_init__(self):
        if self.steps <= 0:
            raise TrainingError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise TrainingError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise TrainingError(f"the prompt learning rate must be > 0, got {self.lr}")
        if self.mode not in MODES:
            raise TrainingError(f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "joint" and self.unfreeze != "none" and self.model_lr <= 0:
            raise TrainingError(f"--model-lr is {self.model_lr} but --unfreeze {self.unfreeze} trains the backbone; "
                                "give a positive --model-lr or --unfreeze none")
        if self.prompt_length <= 0:
            raise TrainingError(f"--prompt-length must be positive, got {self.prompt_length}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown --schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise TrainingError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.eval_every <= 0:
            raise TrainingError(f"--eval-every must be positive, got {self.eval_every}")
        if self.patience < 0:
            raise TrainingError(f"--patience must be >= 0, got {self.patience}")
        if not self.label_temperature > 0:  # also NaN
            raise TrainingError(f"--label-temperature must be > 0, got {self.label_temperature}")
        if self.mixed_precision not in PRECISIONS:
            raise TrainingError(f"unknown --mixed-precision {self.mixed_precision!r}: use one of "
                                f"{', '.join(PRECISIONS)}")
        parse_unfreeze(self.unfreeze)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config"):
        """A config from its to_dict() (a run folder's config.json), reading the names older versions wrote."""
        d = dict(d)
        if "label_temperature" not in d and "temperature" in d and "task" in d:
            d["label_temperature"] = d.pop("temperature")  # older single-task runs called it temperature
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainingError(f"{where}: unknown setting(s) {', '.join(unknown)} for a {cls.__name__}; "
                                "was it written by another kind of run or a newer prompt-composer?")
        return cls(**d)


@dataclass(kw_only=True)
class TrainConfig(TuningConfig):
    """Everything that defines a single-task run; saved as config.json in the run folder."""

    task: str
    """Task spec name or path to a YAML file."""
    save: str | None = None
    """Library name for the result."""

    def __post_init__(self):
        if not self.model:
            raise TrainingError("a single-task run needs a backbone: give --model (e.g. minilm)")
        super().__post_init__()


# -- which backbone weights train ---------------------------------------------------------------
_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def parse_unfreeze(spec: str) -> tuple[str, int]:
    if spec in ("all", "bias", "none"):
        return spec, 0
    m = re.fullmatch(r"last:(\d+)", spec)
    if not m or int(m.group(1)) <= 0:
        raise TrainingError(f"bad --unfreeze {spec!r}: use all, bias, none or last:N with N >= 1")
    return "last", int(m.group(1))


def layer_index(name: str) -> int | None:
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def backbone_filter(spec: str, num_layers: int):
    """One predicate decides which backbone weights train (and are saved): name -> bool."""
    kind, n = parse_unfreeze(spec)
    if kind == "last" and n > num_layers:
        raise TrainingError(f"--unfreeze last:{n} but the backbone has only {num_layers} layers")

    def keep(name: str) -> bool:
        if kind == "all":
            return True
        if kind == "none":
            return False
        if kind == "bias":
            return name.endswith(".bias")
        i = layer_index(name)
        return i is not None and i >= num_layers - n

    return keep


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What a run needs besides the config: the backbone, the task, its data, the model."""

    backbone: Backbone
    spec: object
    train: Encoded
    dev: Encoded
    test: Encoded | None
    model: object
    provenance: dict = field(default_factory=dict)


def default_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.save or f"{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


def _subset(enc: Encoded, n: int | None, seed: int) -> Encoded:
    if n is None or len(enc) <= n:
        return enc
    g = torch.Generator().manual_seed(seed)
    idx = sorted(torch.randperm(len(enc), generator=g)[:n].tolist())
    return Encoded([enc.ids[i] for i in idx], enc.labels[idx],
                   enc.scores[idx] if enc.scores is not None else None)


def prepare(cfg: TrainConfig, backbone: Backbone | None = None, library: Library | None = None,
            prompt_source=None) -> Prepared:
    """Load backbone, task and data, and build the prompted model (nothing trains yet)."""
    from composer.taskdata import load_splits
    from composer.tasks import load_task

    spec = load_task(cfg.task)
    backbone = backbone or load_backbone(cfg.model)
    resolve_head(spec, backbone, cfg.head)  # fail before touching data
    splits = load_splits(spec, data_dir=cfg.data_dir, k_shot=cfg.k_shot, seed=cfg.seed)
    if "train" not in splits:
        raise TrainingError(f"task '{spec.name}' has no train split")
    tok = backbone.tokenizer
    train = encode_split(spec, splits["train"], tok)
    dev_split = "dev" if "dev" in splits else "test"
    dev = encode_split(spec, splits[dev_split], tok)
    test = encode_split(spec, splits["test"], tok) if "test" in splits and dev_split != "test" else None
    if prompt_source is not None:
        prompt, prov = prompt_source, {"init": "module"}
    else:
        prompt, prov = init_prompt(cfg.init, cfg.prompt_length, backbone, spec, cfg.seed, library)
    model = build_model(backbone, spec, prompt, head=cfg.head, temperature=cfg.label_temperature, seed=cfg.seed)
    return Prepared(backbone, spec, train, dev, test, model, prov)


def _param_groups(cfg: TrainConfig, model) -> list[dict]:
    freeze_backbone(model)
    backbone_params = []
    if cfg.mode == "joint":
        keep = backbone_filter(cfg.unfreeze, model.bb.num_layers)
        for n, p in model.backbone.named_parameters():
            if keep(n):
                p.requires_grad_(True)
                backbone_params.append(p)
    ids = {id(p) for p in model.backbone.parameters()}
    own = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": own, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "prompt"}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.model_lr, "weight_decay": 0.01, "name": "backbone"})
    return groups


def make_accelerator(mixed_precision: str, find_unused_parameters: bool):
    """The run's Accelerator: CUDA with ``mixed_precision`` when there is a GPU, else the CPU in fp32.

    accelerate keeps one state per process and refuses an Accelerator whose precision differs from the first
    one's; a single process (a notebook, a benchmark) may train in fp32 and then in bf16, so there the state an
    earlier run left is dropped first. Under a distributed launch the state is the launcher's and stays.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    cuda = torch.cuda.is_available()
    precision = mixed_precision if cuda else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[ddp])


def train(cfg: TrainConfig, prepared: Prepared | None = None, resume: str | Path | None = None,
          library: Library | None = None, progress: bool = True, accelerator=None) -> dict:
    """Train, keep the best dev checkpoint, optionally save to the library. -> a result dict."""
    # joint mode trains backbone weights no head reads (BERT's pooler): DDP must allow unused parameters
    acc = accelerator or make_accelerator(cfg.mixed_precision, find_unused_parameters=cfg.mode == "joint")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if resume:
        run_dir = Path(resume)
        _check_resume(run_dir, cfg)
    cfg.run_dir = str(run_dir)
    prep = prepared or prepare(cfg, library=library)
    model = prep.model
    groups = _param_groups(cfg, model)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model.backbone, True)
    trainable = [p for g in groups for p in g["params"]]  # clip what trains; model.parameters() walks the backbone
    optimizer = torch.optim.AdamW(groups)
    warmup = int(cfg.warmup * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, cfg.steps))
    state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "task": prep.spec.name,
             "model": cfg.model, "mode": cfg.mode}
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    ckpt, best_dir = run_dir / "checkpoint", run_dir / "best"
    if resume and acc.is_main_process:
        recover_dir(ckpt)
        recover_dir(best_dir)
    acc.wait_for_everyone()
    if resume and (ckpt / "state.json").exists():
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        log.info("resuming %s at step %d", run_dir, state["step"])
    model, optimizer = acc.prepare(model, optimizer)
    core = acc.unwrap_model(model)
    dev = _subset(prep.dev, cfg.max_eval, cfg.seed)
    plan = BatchPlan(len(prep.train), cfg.batch_size, cfg.seed)
    pad = prep.backbone.tokenizer.pad_token_id
    every_ckpt = cfg.checkpoint_every or cfg.eval_every
    metrics_path = run_dir / "metrics.jsonl"

    def log_line(rec: dict):
        if acc.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def do_eval(step: int) -> dict:
        r = evaluate(core, prep.spec, dev, cfg.eval_batch_size, acc.device, acc.autocast)
        log_line({"step": step, "eval": r})
        return r

    bar = None
    if progress and acc.is_main_process:
        bar = progress_bar(f"train {prep.spec.name}", cfg.steps, initial=state["step"])
    if state["step"] == 0 and state["best"] is None:
        # the init is a candidate like any checkpoint: a composed prompt may already beat what tuning reaches
        r0 = do_eval(0)
        state.update(initial=r0, best=r0["score"], best_step=0)
        if acc.is_main_process:
            save_trainable(best_dir, trainable_state(core))
    model.train()
    t0, step = time.time(), state["step"]
    try:
        while step < cfg.steps:
            idx = shard(plan.indices(step), acc.process_index, acc.num_processes)
            b = prep.train.batch(idx, pad)
            seed = cfg.seed * 1_000_003 + step  # dropout masks: a function of the step
            torch.random.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every accelerator: slow
            if acc.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            with acc.autocast():
                logits = model(b["input_ids"].to(acc.device), b["attention_mask"].to(acc.device))
                loss = F.cross_entropy(logits.float(), b["labels"].to(acc.device))
            finite = torch.isfinite(loss.detach()).float().view(1)
            if acc.num_processes > 1:  # every process stops together, or the others hang in backward
                finite = acc.gather(finite).min()
            if not finite.item():
                raise TrainingError(f"loss became {loss.item()} at step {step}; the last good checkpoint is in "
                                    f"{ckpt} (lower --lr, currently {cfg.lr})")
            with attention_kernels(acc.device):
                acc.backward(loss)
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            if step % 10 == 0 or step == cfg.steps:
                mean_loss = acc.reduce(loss.detach(), reduction="mean")  # the global batch's, not rank 0's share
                log_line({"step": step, "loss": round(mean_loss.item(), 6), "lr": scheduler.get_last_lr()[0]})
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", best=state["best"] if state["best"] is None
                                else f"{state['best']:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r = do_eval(step)
                if state["best"] is None or r["score"] > state["best"]:
                    state.update(best=r["score"], best_step=step, bad_evals=0)
                    if acc.is_main_process:
                        save_trainable(best_dir, trainable_state(core))
                else:
                    state["bad_evals"] += 1
                if cfg.patience and state["bad_evals"] >= cfg.patience:
                    log.info("early stop at step %d (no gain in %d evaluations)", step, cfg.patience)
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
    if (best_dir / "trainable.safetensors").exists():
        load_trainable(core, load_file(str(best_dir / "trainable.safetensors")))
    result = {"task": prep.spec.name, "model": cfg.model, "steps": step, "best_step": state["best_step"],
              "seconds": round(time.time() - t0, 2), "run_dir": str(run_dir), "metric": prep.spec.metric,
              "initial": state.get("initial"), "best": state["best"],  # both on the same dev subset (max_eval)
              "dev": evaluate(core, prep.spec, prep.dev, cfg.eval_batch_size, acc.device, acc.autocast)}
    if prep.test is not None:
        result["test"] = evaluate(core, prep.spec, prep.test, cfg.eval_batch_size, acc.device, acc.autocast)
    if cfg.save and acc.is_main_process:
        save_to_library(library or Library(), cfg.save, core, prep, cfg, result)
        result["saved"] = cfg.save
    if acc.is_main_process:
        atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2, sort_keys=True))
    return result


def _check_resume(run_dir: Path, cfg: TrainConfig) -> None:
    cfile = run_dir / "config.json"
    if not cfile.exists():
        raise TrainingError(f"--resume {run_dir}: no config.json there; is it a run folder?")
    old = json.loads(cfile.read_text())
    for key in ("task", "model", "mode"):
        if old.get(key) != getattr(cfg, key):
            raise TrainingError(f"--resume {run_dir}: that run has {key} '{old.get(key)}', this one "
                                f"'{getattr(cfg, key)}'; resume with the same settings or start a new run")


def save_to_library(library: Library, name: str, model, prep: Prepared, cfg: TrainConfig, result: dict):
    """The trained prompt (+ head weights, + changed backbone weights in joint mode) as a library entry."""
    src = model.prompt_source
    if hasattr(src, "composer"):  # a mixture: its static prompt is the mean mixed prompt over training inputs
        from composer.compose import distill_over

        distill_over(model, prep.train)
        prep.provenance["strategy"] = "attention"
    static = src.static() if hasattr(src, "static") else None
    extras = {}
    head_state = {k: v for k, v in model.head.state_dict().items() if k.startswith("proj.")}
    if head_state:
        extras["head"] = head_state
    if hasattr(src, "state_for_save"):
        tensors, conf = src.state_for_save()
        extras["composer"] = tensors
        prep.provenance["composer_config"] = conf
    if cfg.mode == "joint":
        keep = backbone_filter(cfg.unfreeze, prep.backbone.num_layers)
        delta = {n: p.detach() for n, p in model.backbone.named_parameters() if keep(n)}
        if delta:
            extras["backbone"] = delta
    if static is None:
        raise ComposerError("this prompt source has no static prompt to save")
    meta = {"task": prep.spec.name, "backbone": prep.backbone.name, "family": prep.backbone.family,
            "head": model.head.kind, "metrics": {k: result[k] for k in ("dev", "test") if k in result},
            "config": cfg.to_dict(), "provenance": prep.provenance}
    return library.save(name, static, meta, extras=extras)
