"""What the two training loops share: the run folder, the optimizer, one training step, the split choice.

train.py (one task) and multitask.py (many tasks, mixed batches) each keep their own short loop that reads
top to bottom; they differ only in the batch, the forward call and how the best checkpoint is kept. The rest
is here, written once:

    make_accelerator(precision, ...)    CUDA with mixed precision when there is a GPU, else the CPU in fp32
    param_groups(cfg, model)            the prompt's group, and the backbone's in joint mode
    Optimizer(cfg, model)               AdamW + warm-up schedule over those groups, and what to clip
    RunFolder(...)                      config.json, the resume check, metrics.jsonl, checkpoint/ and best/;
                                        owned by one process at a time (a lock on RUN/.lock)
    seed_step(seed, step, device)       dropout masks: a function of (seed, step), so a resume repeats them
    training_step(...)                  finite-loss check, backward, clipping, optimizer and schedule step
    encode_splits(spec, splits, tok)    train, dev (dev, else test) and test (when dev exists)

A resumed run sees exactly the batches and dropout masks an uninterrupted one would: the batch at step s is a
pure function of (seed, s) (composer/runstate.py's plans), and so is the dropout RNG (seed_step).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, PartialState

from composer.atomic import atomic_write_text
from composer.config import TuningConfig, parse_unfreeze
from composer.lora import is_lora_param
from composer.encoding import Encoded, encode_split
from composer.errors import TrainingError
from composer.model import attention_kernels, freeze_backbone, set_activation_checkpointing
from composer.runstate import load_checkpoint, lr_lambda, recover_dir, save_checkpoint

log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str, find_unused_parameters: bool) -> Accelerator:
    """The run's Accelerator: CUDA with ``mixed_precision`` when there is a GPU, else the CPU in fp32.

    accelerate keeps one state per process and refuses an Accelerator whose precision differs from the first
    one's; a single process (a notebook, a benchmark) may train in fp32 and then in bf16, so there the state an
    earlier run left is dropped first. Under a distributed launch the state is the launcher's and stays.
    """
    cuda = torch.cuda.is_available()
    precision = mixed_precision if cuda else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=precision, cpu=not cuda, kwargs_handlers=[ddp])


# -- which backbone weights train ---------------------------------------------------------------
_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


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


def param_groups(cfg: TuningConfig, model) -> list[dict]:
    """The optimizer's groups: "prompt" (prompt sources, composers, heads: everything not the backbone that
    trains) at ``cfg.lr``, and in joint mode "backbone" (the weights ``cfg.unfreeze`` picks) at ``cfg.model_lr``.

    ``model`` is a PromptedModel or a MultiTaskModel; the backbone is frozen first, then unfrozen as chosen."""
    freeze_backbone(model)
    backbone_params = []
    lora = cfg.mode == "joint" and cfg.adapter == "lora"
    if lora:  # PEFT's LoRA layers, injected by prepare: they train, no backbone weight does
        for n, p in model.network.named_parameters():
            if is_lora_param(n):
                p.requires_grad_(True)
                backbone_params.append(p)
    elif cfg.mode == "joint":
        keep = backbone_filter(cfg.unfreeze, model.backbone.num_layers)
        for n, p in model.network.named_parameters():
            if keep(n):
                p.requires_grad_(True)
                backbone_params.append(p)
    ids = {id(p) for p in model.network.parameters()}
    own = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": own, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "prompt"}]
    if lora:
        groups.append({"params": backbone_params, "lr": cfg.lora_lr, "weight_decay": 0.0, "name": "lora"})
    elif backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.model_lr, "weight_decay": 0.01, "name": "backbone"})
    return groups


class Optimizer:
    """AdamW over ``param_groups`` with the config's warm-up schedule; ``trainable`` is what gets clipped."""

    def __init__(self, cfg: TuningConfig, model):
        groups = param_groups(cfg, model)
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model.network, True)
        self.trainable = [p for g in groups for p in g["params"]]  # model.parameters() walks the backbone too
        self.optimizer = torch.optim.AdamW(groups)
        warmup = int(cfg.warmup * cfg.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.schedule, warmup, cfg.steps))

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def seed_step(seed: int, step: int, device: torch.device) -> None:
    """Dropout masks as a function of the step: reseed the CPU generator (and the GPU's on CUDA).

    torch.manual_seed would also seed every accelerator's generator: slow, and not needed off CUDA."""
    s = seed * 1_000_003 + step
    torch.random.default_generator.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.manual_seed(s)


def training_step(acc: Accelerator, loss: torch.Tensor, opt: Optimizer, max_grad_norm: float, step: int,
                  run: RunFolder, lr: float) -> None:
    """Check the loss is finite on every process, backpropagate, clip what trains, step, zero the gradients."""
    finite = torch.isfinite(loss.detach()).float().view(1)
    if acc.num_processes > 1:  # every process stops together, or the others hang in backward
        finite = acc.gather(finite).min()
    if not finite.item():
        # a checkpoint/ an earlier run left there is not this run's: name only one this run wrote or resumed
        where = (f"the last good checkpoint is in {run.checkpoint}" if run.checkpointed
                 else "no checkpoint was written yet")
        raise TrainingError(f"loss became {loss.item()} at step {step}; {where} (lower --lr, currently {lr})")
    with attention_kernels(acc.device):
        acc.backward(loss)
    if max_grad_norm:
        acc.clip_grad_norm_(opt.trainable, max_grad_norm)
    opt.optimizer.step()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)


def out_of_patience(state: dict, patience: int, step: int) -> bool:
    """Early stopping: ``patience`` evaluations in a row without a gain (0: never). Marks ``state``."""
    if patience and state["bad_evals"] >= patience:
        log.info("early stop at step %d (no gain in %d evaluations)", step, patience)
        state["stopped_early"] = True
        return True
    return False


# -- the run folder -------------------------------------------------------------------------------
_SHOWN = {"backbone": "model"}  # the flag a user knows a setting by, where it differs from the field


def check_resume(run_dir: Path, cfg: TuningConfig, keys: tuple[str, ...]) -> None:
    """The run in ``run_dir`` is of this kind and has the same ``keys`` settings (before anything loads)."""
    cfile = run_dir / "config.json"
    if not cfile.exists():
        raise TrainingError(f"--resume {run_dir}: no config.json there; is it a run folder?")
    try:
        old = json.loads(cfile.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise TrainingError(f"--resume {run_dir}: {cfile} cannot be read as JSON ({str(e).splitlines()[0]}); "
                            "it is not a run's config.json") from None
    if not isinstance(old, dict):
        raise TrainingError(f"--resume {run_dir}: {cfile} holds {type(old).__name__}, not a run's settings")
    old = type(cfg)._upgrade(old)
    multitask = "tasks" in keys
    if multitask and "tasks" not in old:
        raise TrainingError(f"--resume {run_dir}: that is a single-task run ('{old.get('task')}'); resume it "
                            "with `prompt-composer train` or start a new multitask run")
    if not multitask and "tasks" in old:
        raise TrainingError(f"--resume {run_dir}: that is a multitask run; resume it with "
                            "`prompt-composer train --multitask --resume` or start a new run")
    for key in keys:
        if old.get(key) != getattr(cfg, key):
            got, want = old.get(key), getattr(cfg, key)
            shown = (f"'{got}', this one '{want}'" if not multitask else f"{got!r}, this one {want!r}")
            raise TrainingError(f"--resume {run_dir}: that run has {_SHOWN.get(key, key)} {shown}; resume with "
                                "the same settings or start a new run")


def _is_run_folder(path: Path) -> bool:
    """A folder a run wrote: its config.json is a run's (a task or tasks, and steps), not a model's."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("task" in cfg or "tasks" in cfg) and "steps" in cfg


class RunFolder:
    """A run's folder: config.json, metrics.jsonl, checkpoint/ (to resume) and best/ (the best so far).

    Only the main process writes; ``owned`` holds the folder for this run (a second process refuses, and a
    folder that is not a run's is never written into); ``open`` recovers folders a crash left mid-swap and
    loads the checkpoint."""

    def __init__(self, path: Path, acc: Accelerator):
        self.path, self.acc = Path(path), acc
        self.checkpoint, self.best = self.path / "checkpoint", self.path / "best"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpointed = False
        """Whether this run wrote (or resumed from) checkpoint/; one an earlier run left does not count."""

    @contextlib.contextmanager
    def owned(self, resume: bool) -> Iterator[RunFolder]:
        """Hold the folder for this run: an exclusive, non-blocking flock on RUN/.lock, released at the end.

        Refused in one line (before anything is written): a folder another process holds (two runs of one
        --save would interleave their metrics and save each other's prompt), a file, and an existing folder
        with files in it that is not a run folder (its best/ and checkpoint/ would be replaced)."""
        f, problem = None, None
        if self.acc.is_main_process:  # the main process owns the folder for every rank
            try:
                f = self._take(resume)
            except TrainingError as e:
                problem = str(e)
        if self.acc.num_processes > 1:  # every rank learns the main process's answer: none waits on a refused run
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem], from_process=0)[0]
        if problem:
            raise TrainingError(problem)
        try:
            yield self
        finally:
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()

    def _take(self, resume: bool):
        """The main process's checks and its flock on RUN/.lock (the open file), or TrainingError."""
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"run folder {self.path} is a file; give another --run-dir (or --save name)")
        if (not resume and self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())
                and not _is_run_folder(self.path)):
            raise TrainingError(f"run folder {self.path} holds files and is not a run folder (no run's "
                                "config.json); give a new or empty --run-dir (or another --save name)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / ".lock", "a")
        except OSError as e:
            raise TrainingError(f"cannot write the run folder {self.path} ({e.strerror or e}); give another "
                                "--run-dir") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise TrainingError(f"run folder {self.path} is in use by another run (it holds {self.path / '.lock'}); "
                                "wait for it to finish, or give another --save name or --run-dir") from None
        return f

    def open(self, cfg: TuningConfig, resume: bool, best_dirs: list[Path], model, opt: Optimizer,
             state: dict) -> dict:
        """Write config.json; on resume, recover the folders and return the checkpoint's state (else ``state``)."""
        if self.acc.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            if resume:
                for d in [self.checkpoint, *best_dirs]:
                    recover_dir(d)
        self.acc.wait_for_everyone()
        if resume and self.has_checkpoint():
            state = load_checkpoint(self.checkpoint, model, opt.optimizer, opt.scheduler)
            self.checkpointed = True
            log.info("resuming %s at step %d", self.path, state["step"])
        return state

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "state.json").exists()

    def log(self, rec: dict) -> None:
        """One line of metrics.jsonl."""
        if self.acc.is_main_process:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save_checkpoint(self, model, opt: Optimizer, state: dict) -> None:
        if self.acc.is_main_process:
            save_checkpoint(self.checkpoint, model, opt.optimizer, opt.scheduler, state)
        self.checkpointed = True

    @contextlib.contextmanager
    def interruptible(self, model, opt: Optimizer, state: dict, bar=None) -> Iterator[None]:
        """Around the loop: Ctrl-C saves a checkpoint at ``state["step"]`` and says how to resume; the
        progress bar closes whatever happens."""
        try:
            yield
        except KeyboardInterrupt:
            step = state["step"]
            if step > 0:
                self.save_checkpoint(model, opt, state)
            raise TrainingError(f"interrupted at step {step}; continue with --resume {self.path}") from None
        finally:
            if bar:
                bar.close()

    def write_result(self, result: dict) -> None:
        if self.acc.is_main_process:
            atomic_write_text(self.path / "result.json", json.dumps(result, indent=2, sort_keys=True))


# -- the data ----------------------------------------------------------------------------------------
def encode_splits(spec, splits: dict, tokenizer) -> tuple[Encoded, Encoded, Encoded | None]:
    """-> (train, dev, test) encoded. Dev is the dev split, else the test split (and then there is no test:
    a split used to choose the best checkpoint is never reported as a test score)."""
    if "train" not in splits:
        raise TrainingError(f"task '{spec.name}' has no train split")
    dev_split = "dev" if "dev" in splits else "test"
    train = encode_split(spec, splits["train"], tokenizer)
    dev = encode_split(spec, splits[dev_split], tokenizer)
    test = encode_split(spec, splits["test"], tokenizer) if "test" in splits and dev_split != "test" else None
    return train, dev, test
