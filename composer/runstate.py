"""What makes a training run safe to kill: batch order and atomic checkpoints.

- The batch at step s is a pure function of (seed, s) (``BatchPlan``): indices come from
  per-epoch permutations seeded by (seed, epoch), so a resumed run sees exactly the batches
  an uninterrupted run would; ``MixturePlan`` does the same over several tasks mixed
  in one batch.
- A checkpoint (trainable tensors as safetensors, optimizer/scheduler state, step, best
  score) is written into a temporary folder and renamed over the previous one, so a crash
  or a full disk mid-write leaves the previous checkpoint whole.

Shared by composer.train (one task) and composer.multitask (many).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from composer.atomic import swap_dir
from composer.errors import TrainingError

log = logging.getLogger(__name__)


# -- data order ---------------------------------------------------------------------------------
class BatchPlan:
    """The global batch at step s is a pure function of (seed, s): resumable with no sampler state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out


def shard(idx: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global batch (contiguous, equal sizes when divisible)."""
    per = math.ceil(len(idx) / world)
    return idx[rank * per : (rank + 1) * per]


def lr_lambda(schedule: str, warmup_steps: int, total: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        frac = (step - warmup_steps) / max(1, total - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0

    return f


# -- checkpoints --------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32).contiguous().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    # checkpoints written before the backbone's network was registered as "network" named it "backbone"
    tensors = {("network." + n[len("backbone."):] if n.startswith("backbone.") and n not in params else n): t
               for n, t in tensors.items()}
    missing = [n for n in tensors if n not in params]
    if missing:
        raise TrainingError(f"checkpoint holds parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))


def _atomic_dir(final: Path, write) -> None:
    """Write a folder whole or not at all: fill a temp folder, then swap it in."""
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """A kill between the two renames of _atomic_dir leaves only .NAME.*.old beside it: put it back."""
    if final.exists():
        return
    olds = sorted(final.parent.glob(f".{final.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if olds:
        log.warning("%s was being replaced when the run stopped; restoring the previous one", final)
        os.rename(olds[-1], final)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    def write(d: Path):
        save_file(trainable_state(model), str(d / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
        (d / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    _write_or_fail(path, write)


def save_trainable(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A best-checkpoint folder: the trainable tensors only, written whole or not at all."""
    _write_or_fail(path, lambda d: save_file(tensors, str(d / "trainable.safetensors")))


def _write_or_fail(path: Path, write) -> None:
    """A full disk (or any OSError) mid-write: a one-line error; the folder there before stays whole."""
    try:
        _atomic_dir(path, write)
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e.strerror or e}); the previous one there is intact") from None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """The checkpoint's tensors into ``model``, its optimizer and schedule state; -> its state.json. A file
    cut short or overwritten is one TrainingError naming it (no pickle: optimizer.pt loads weights_only)."""
    what = path / "trainable.safetensors"
    try:
        load_trainable(model, load_file(str(what)))
        what = path / "optimizer.pt"
        opt = torch.load(what, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        what = path / "state.json"
        state = json.loads(what.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step in it")
    except TrainingError:
        raise
    except Exception as e:  # SafetensorError, pickle.UnpicklingError, KeyError, JSONDecodeError, OSError...
        raise TrainingError(f"the checkpoint in {path} cannot be resumed: {what.name} is truncated or corrupted "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); remove {path} and resume to "
                            "train again from step 0, or start a new run") from None
    return state


# -- data order over several tasks ---------------------------------------------------------
def mixture_weights(sizes: list[int], temperature: float) -> torch.Tensor:
    """p_i = n_i ** (1/T) / sum_j n_j ** (1/T): sizes [K] -> probabilities [K] (float64)."""
    if not temperature > 0:
        raise TrainingError(f"--temperature must be > 0, got {temperature}")
    n = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    if (n <= 0).any():
        raise TrainingError(f"every task needs training examples, got sizes {list(sizes)}")
    return torch.softmax(n.log() / temperature, dim=0)  # in log space: no overflow for small T


class MixturePlan:
    """The global batch at step s is a pure function of (seed, s), like BatchPlan, over several tasks.

    Each position draws a task with ``mixture_weights`` (one seeded draw per step), then the next example of
    that task's own permutation stream (a BatchPlan of batch 1 per task, seeded apart). The position in a
    task's stream is the number of earlier draws of that task, recounted from step 0 when a run resumes
    (one small multinomial per step: a fraction of a second for 100k steps), so there is no sampler state.
    """

    def __init__(self, sizes: list[int], batch_size: int, seed: int, temperature: float):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.probs = mixture_weights(sizes, temperature)  # [K]
        self.streams = [BatchPlan(n, 1, seed * 1009 + 1 + i) for i, n in enumerate(sizes)]
        self._at = (0, [0] * len(sizes))  # (step, draws of each task before that step)

    def tasks(self, step: int) -> list[int]:
        """The task of each position of step ``step``'s global batch: [batch_size] task positions."""
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + step)
        return torch.multinomial(self.probs, self.batch_size, replacement=True, generator=g).tolist()

    def _counts(self, step: int) -> list[int]:
        at, counts = self._at
        if at > step:
            at, counts = 0, [0] * len(self.sizes)
        counts = list(counts)
        for s in range(at, step):
            for t in self.tasks(s):
                counts[t] += 1
        self._at = (step, counts)
        return list(counts)

    def indices(self, step: int) -> list[tuple[int, int]]:
        """-> [(task position, example index in that task's train split)] for every position of the batch."""
        counts = self._counts(step)
        out = []
        for t in self.tasks(step):
            out.append((t, self.streams[t].indices(counts[t])[0]))
            counts[t] += 1
        return out


def read_curves(run_dir: str | Path, name: str = "dev") -> dict[str, tuple[list[int], list[float]]]:
    """Dev score at each evaluated step, from a run folder's metrics.jsonl: {name: (steps, scores)} for a
    single-task run, {task: (steps, scores)} for a multitask one. A step evaluated twice (a resumed run
    redoes the steps after its last checkpoint) keeps its last value; a torn last line is skipped."""
    per: dict[str, dict[int, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise TrainingError(f"{run_dir}: no metrics.jsonl there; is it a run folder?")
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("eval")
        if not ev:
            continue
        for key, r in ({name: ev} if "score" in ev else ev).items():
            per.setdefault(key, {})[int(rec["step"])] = float(r["score"])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in per.items()}


def progress_bar(desc: str, total: int | None = None, initial: int = 0, unit: str = "step"):
    """The progress bar of long work: on stderr, only on a terminal (not in logs), gone when done."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False, disable=None)
