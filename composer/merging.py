"""Merging math for prompts: task vectors, task arithmetic, TIES and DARE (pure: torch only).

A task vector is a tuned prompt minus the prompt it started from (Ilharco et al. 2023, "Editing models
with task arithmetic"; for soft prompts, Belanec et al. 2024, "Task Prompt Vectors"). Vectors that start
from one base can be added, scaled, trimmed and sign-elected as LoRA and model merges do (PEFT's
add_weighted_adapter, mergekit). Shapes: K vectors, each a prompt [P, H] or a prefix [L, 2, P, D]; every
function takes either, and treats the last two dimensions as one matrix (a prefix is a stack of L*2
per-layer prompts, so trimming keeps the top entries of each layer's keys and of its values separately,
as PEFT trims each adapted weight matrix on its own).

    task_vector(prompt, init)                    prompt - init
    arithmetic(base, vectors [K, ...], w [K])    base + scale * sum_k w_k tau_k      (negative w_k subtract)
    trim(vector, density)                        keep the top density-fraction of |entries|, zero the rest
    elect_sign(vectors, w)                       per entry, the sign of sum_k w_k tau_k (0 counts as +)
    disjoint_mean(vectors, w, sign)              per entry, the |w|-weighted mean over the vectors that agree
    ties(vectors, w, density, dare, generator)   (DARE) -> trim -> elect -> disjoint mean: one vector
    dare(vector, p, generator)                   drop each entry with probability p, rescale the rest by 1/(1-p)

How these read against PEFT's merge_utils (TIES: Yadav et al. 2023; DARE: Yu et al. 2024):
- trim keeps ceil(density * n) entries (PEFT: int(density * n), which can keep none); equal magnitudes at the
  cut go to torch.topk.
- the sign is elected on the *weighted* vectors (as mergekit does; PEFT elects on the unweighted ones), so a
  negative weight votes for the opposite sign, which is what subtracting a skill asks of the vote.
- the disjoint mean divides by the summed |w_k| of the agreeing vectors (mergekit normalises by sum w_k, PEFT
  by their count): with unit weights it is TIES' mean over the agreeing nonzero entries, and a weight's scale
  never cancels its sign.
- DARE drops before the trim (density 1 after DARE is mergekit's dare_ties).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from composer.errors import ComposeError  # standard library only, as mixing.py does

__all__ = ["MergeError", "task_vector", "check_vectors", "arithmetic", "trim", "elect_sign", "disjoint_mean",
           "ties", "dare", "check_density", "check_drop"]


class MergeError(ComposeError):
    """Bad input to a merge (shapes, fractions, weights), in one line."""


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _check_prompt(t, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() not in (2, 4):
        shape = _shape(t) if isinstance(t, Tensor) else type(t).__name__
        raise MergeError(f"{what} must be a prompt [P, H] or a prefix [L, 2, P, D], got {shape}")
    return t


def check_density(density: float, what: str = "density") -> float:
    d = float(density)
    if not (math.isfinite(d) and 0 < d <= 1):
        raise MergeError(f"{what} is the fraction of each task vector's entries kept, in (0, 1]; got {density!r}")
    return d


def check_drop(p: float, what: str = "DARE's drop probability") -> float:
    q = float(p)
    if not (math.isfinite(q) and 0 <= q < 1):
        raise MergeError(f"{what} must be in [0, 1) (1 would drop every entry), got {p!r}")
    return q


def task_vector(prompt: Tensor, init: Tensor) -> Tensor:
    """prompt - init, both [P, H] or both [L, 2, P, D]."""
    _check_prompt(prompt, "the prompt")
    _check_prompt(init, "the init")
    if prompt.shape != init.shape:
        raise MergeError(f"a task vector needs the prompt and its init in one shape: prompt {_shape(prompt)}, "
                         f"init {_shape(init)}")
    return prompt.float() - init.float()


def check_vectors(vectors: Tensor | Sequence[Tensor], names: Sequence[str] | None = None) -> Tensor:
    """K task vectors of one shape, stacked: [K, P, H] or [K, L, 2, P, D]; finite."""
    items = list(vectors)
    if not items:
        raise MergeError("no task vectors to merge (K == 0)")
    label = (lambda i: f"{names[i]!r}") if names is not None else (lambda i: f"#{i}")
    for i, v in enumerate(items):
        _check_prompt(v, f"task vector {label(i)}")
        if v.shape != items[0].shape:
            raise MergeError(f"task vectors differ in shape: {label(0)} is {_shape(items[0])} but {label(i)} is "
                             f"{_shape(v)}; merge prompts of one length and kind")
        if not torch.isfinite(v).all():
            raise MergeError(f"task vector {label(i)} has NaN or infinite entries")
    return torch.stack([v.float() for v in items])


def _weights(weights, K: int, device) -> Tensor:
    w = torch.ones(K) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.dim() != 1 or w.shape[0] != K:
        raise MergeError(f"weights must be [K] = [{K}], got shape {_shape(w)}")
    if not torch.isfinite(w).all():
        raise MergeError(f"weights must be finite, got {w.tolist()}")
    return w.to(device=device, dtype=torch.float32)


def _per_entry(w: Tensor, stack: Tensor) -> Tensor:
    return w.view(-1, *([1] * (stack.dim() - 1)))  # [K, 1, ..., 1]


def arithmetic(base: Tensor | None, vectors: Tensor | Sequence[Tensor], weights=None, scale: float = 1.0) -> Tensor:
    """Task arithmetic: base + scale * sum_k w_k tau_k -> the shape of base.

    ``weights`` [K] (None: all 1) may be negative: a negative weight subtracts that task. With weights summing
    to 1, scale 1 and one shared init as the base, this is the weighted average of the prompts; it differs
    from averaging where the weights sum to more (adding skills) or the candidates started from different
    inits.
    """
    if base is None:
        raise MergeError("task arithmetic needs a base to add the task vectors to (the prompt they started "
                         "from); give one")
    _check_prompt(base, "the base")
    stack = check_vectors(vectors)  # [K, ...]
    if stack.shape[1:] != base.shape:
        raise MergeError(f"the base is {_shape(base)} but the task vectors are {_shape(stack[0])}: give a base of "
                         "the candidates' shape (same length, hidden size and kind)")
    s = float(scale)
    if not math.isfinite(s):
        raise MergeError(f"scale must be a finite number, got {scale!r}")
    w = _weights(weights, stack.shape[0], stack.device)
    return base.float() + s * (_per_entry(w, stack) * stack).sum(0)


def trim(vector: Tensor, density: float) -> Tensor:
    """Keep the ceil(density * n) entries of largest magnitude in each [P, H] matrix (n = P*H), zero the rest.

    vector [P, H] -> [P, H]; a prefix [L, 2, P, D] is trimmed per layer's keys and per layer's values.
    """
    _check_prompt(vector, "the task vector")
    d = check_density(density)
    rows = vector.float().reshape(-1, vector.shape[-2] * vector.shape[-1])  # [G, n]: one row per matrix
    k = math.ceil(d * rows.shape[1])
    if k >= rows.shape[1]:
        return vector.float().clone()
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(1, rows.abs().topk(k, dim=1).indices, True)
    return (rows * keep).reshape(vector.shape)


def elect_sign(vectors: Tensor, weights=None) -> Tensor:
    """TIES' sign election: per entry, +1 or -1 by the sign of sum_k w_k tau_k (a zero sum elects +1).

    vectors [K, ...] -> [...]. "total" election (PEFT's default): the larger total mass wins, not the
    larger count.
    """
    w = _weights(weights, vectors.shape[0], vectors.device)
    total = (_per_entry(w, vectors) * vectors).sum(0)
    return torch.where(total >= 0, 1.0, -1.0)


def disjoint_mean(vectors: Tensor, weights, sign: Tensor) -> Tensor:
    """TIES' disjoint merge: per entry, sum_k w_k tau_k / sum_k |w_k| over the k whose w_k tau_k has the
    elected sign (zero entries never agree); 0 where none does. vectors [K, ...], sign [...] -> [...]."""
    w = _weights(weights, vectors.shape[0], vectors.device)
    wv = _per_entry(w, vectors) * vectors  # [K, ...]
    agree = torch.sign(wv) == sign  # [K, ...]
    mass = (_per_entry(w.abs(), vectors) * agree).sum(0)
    return torch.where(mass > 0, (wv * agree).sum(0) / mass.clamp(min=1e-12), torch.zeros_like(mass))


def dare(vector: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: drop each entry with probability p and rescale the survivors by 1 / (1 - p).

    The expectation is the vector itself. p = 0 returns it unchanged. ``generator`` (a CPU one) seeds the
    mask.
    """
    _check_prompt(vector, "the task vector")
    q = check_drop(p)
    if q == 0:
        return vector.float().clone()
    keep = torch.rand(vector.shape, generator=generator) >= q  # drawn on the CPU: the same mask on any device
    return vector.float() * keep.to(vector.device) / (1 - q)


def ties(vectors: Tensor | Sequence[Tensor], weights=None, density: float = 0.2, drop: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """TIES-merging of K task vectors -> one task vector (add it to a base with ``arithmetic``).

    vectors [K, P, H] or [K, L, 2, P, D]; weights [K] (None: all 1). Each vector is (with ``drop`` > 0, first
    DARE-dropped and rescaled, then) trimmed to its top ``density`` fraction by magnitude; per entry the sign
    of the weighted sum is elected; the result is the |w|-weighted mean of the entries that agree with it.
    """
    stack = check_vectors(vectors)  # [K, ...]
    check_density(density)
    check_drop(drop)
    w = _weights(weights, stack.shape[0], stack.device)
    if drop > 0:
        stack = torch.stack([dare(v, drop, generator) for v in stack])
    stack = torch.stack([trim(v, density) for v in stack])
    return disjoint_mean(stack, w, elect_sign(stack, w))
