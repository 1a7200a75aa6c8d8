"""Prompt similarity: pure functions over stacks of prompts, tensors in and out.

Dimension letters: N and M prompts, P prompt tokens, H hidden size, L layers,
F feed-forward neurons per layer. Every function works on whole stacks at once;
an all-pairs matrix is one (or a few chunked) matmuls, never a Python loop over pairs.

Metrics (higher is always "more similar"):

- ``cos-avg``    cosine of the prompts averaged over P (E_avg in Su et al. 2022; SPoT).
- ``euclid-avg`` minus the euclidean distance of the averaged prompts.
- ``cos-tok``    mean over positions i of cos(a_i, b_i) (E_tok); needs equal P.
- ``euclid-tok`` minus the mean over positions i of ||a_i - b_i||; needs equal P.
- ``on``         overlap of the FFN neurons a prompt activates (Su et al. 2022), on
                 boolean masks [N, L, F] from :func:`capture_ffn_activations`.

Design choices, written once here:

- Euclid as a similarity is the *negative* distance (self-similarity 0, everything
  else < 0). It keeps the ranking and the scale of the distance; 1/(1+d) would squash
  the distances of trained prompts (tens to hundreds) into a sliver near 0.
- Token-wise metrics compare token i with token i, so prompts of different lengths
  are an error (naming both lengths), not silently aligned: any alignment (truncate,
  pad, resample) would invent a correspondence the prompts were not trained with.
  Use ``cos-avg`` to compare prompts of different lengths.
- ON follows Su et al.: binarize the activations, then the cosine of the binary
  vectors, |a AND b| / sqrt(|a| |b|), per layer, averaged over the layer window
  (Su et al. concatenate the window's layers into one vector; with equal F per layer
  the two differ only in how layers with many active neurons are weighted).
  ``measure="jaccard"`` gives |a AND b| / |a OR b| instead.
- A neuron is "activated" by a prompt when it fires (> 0) on more than half of the
  probe tokens (``threshold=0.5``). The mean activation > 0 rule would mark almost every
  neuron of a ReLU (T5) or GELU (BERT) network, whose negative side is 0 or tiny.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from composer.config import SIMILARITY_METRICS
from composer.errors import ComposerError

__all__ = [
    "FFN_PATTERN",
    "METRICS",
    "METRIC_HELP",
    "capture_ffn_activations",
    "check_metric",
    "check_top_k",
    "on_similarity",
    "pairwise",
    "spearman",
    "topk",
]

METRICS = SIMILARITY_METRICS

METRIC_HELP = {
    "cos-avg": "cosine of the prompts averaged over their tokens (E_avg; SPoT); 1 = same direction",
    "euclid-avg": "minus the euclidean distance of the averaged prompts; 0 = identical, lower = farther",
    "cos-tok": "mean over positions of the cosine between token i of each prompt (E_tok); equal lengths only",
    "euclid-tok": "minus the mean over positions of the distance between token i of each prompt (equal P)",
    "on": "overlap of the backbone's FFN neurons each prompt activates on a probe batch (Su et al. 2022)",
}

# FFN activation modules by family, as module-name regexes:
# BERT `*.intermediate` (its output is post-GELU), Llama `*.mlp.act_fn`,
# T5 `*.DenseReluDense.act`, GPT-2 `*.mlp.act`.
FFN_PATTERN = r"(^|\.)(intermediate|mlp\.act_fn|DenseReluDense\.act|mlp\.act)$"

# Above this many float32 elements in an intermediate, work in row chunks (~256 MB).
_CHUNK_ELEMENTS = 1 << 26
_EPS = 1e-8


# --- checks at the boundary ------------------------------------------------------


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is known, else raise a ComposerError listing the valid ones."""
    if metric not in METRICS:
        raise ComposerError(f"unknown similarity metric {metric!r}: use one of {', '.join(METRICS)}")
    return metric


def check_top_k(k: int) -> int:
    """Return ``k`` as an int >= 1, else raise a ComposerError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ComposerError(f"--top-k must be a whole number >= 1, got {k!r}")
    return int(k)


def _stack(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ComposerError(f"{what} must be a torch tensor [N, P, H], got {type(x).__name__}")
    if x.dim() == 2:  # a single prompt [P, H]
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ComposerError(f"{what} must have shape [N, P, H] (or [P, H]), got {list(x.shape)}")
    if not x.is_floating_point():
        raise ComposerError(f"{what} must be floating point, got {x.dtype}")
    return x.float()  # float32 throughout: half-precision dot products over P*H lose too much


def _pair(a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    a = _stack(a, "prompts_a")
    if b is None:
        return a, a, True
    b = _stack(b, "prompts_b")
    if a.shape[-1] != b.shape[-1]:
        raise ComposerError(
            f"prompts have different hidden sizes: {a.shape[-1]} (prompts_a) vs {b.shape[-1]} (prompts_b); "
            "compare prompts of one backbone"
        )
    return a, b, False


def _rows_per_chunk(cost_per_row: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, cost_per_row))


# --- the metrics -------------------------------------------------------------------


def _cos_avg(a: Tensor, b: Tensor, same: bool) -> Tensor:
    an = F.normalize(a.mean(dim=1), dim=-1, eps=_EPS)  # [N, H]
    bn = an if same else F.normalize(b.mean(dim=1), dim=-1, eps=_EPS)  # [M, H]
    return (an @ bn.T).clamp_(-1.0, 1.0)


def _neg_dist(a: Tensor, b: Tensor, same: bool) -> Tensor:
    """-||a_n - b_m|| for a [N, D], b [M, D], through one matmul: |a|^2 + |b|^2 - 2 a.b."""
    d2 = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * (a @ b.T)  # [N, M]
    d = d2.clamp_(min=0.0).sqrt_().neg_()
    if same:
        d.fill_diagonal_(0.0)  # exact, where the expansion leaves rounding noise
    return d


def _euclid_avg(a: Tensor, b: Tensor, same: bool) -> Tensor:
    am = a.mean(dim=1)
    return _neg_dist(am, am if same else b.mean(dim=1), same)


def _check_lengths(a: Tensor, b: Tensor, metric: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ComposerError(
            f"{metric} compares token i with token i and needs prompts of equal length: "
            f"got P={a.shape[1]} (prompts_a) and P={b.shape[1]} (prompts_b); use cos-avg for prompts "
            "of different lengths"
        )


def _cos_tok(a: Tensor, b: Tensor, same: bool) -> Tensor:
    _check_lengths(a, b, "cos-tok")
    N, P, H = a.shape
    # mean_i cos(a_i, b_i) = (1/P) <a_hat, b_hat> with a_hat the row-normalised tokens
    # flattened to [N, P*H]: one matmul over P*H instead of P small ones.
    an = F.normalize(a, dim=-1, eps=_EPS).reshape(N, P * H)
    bn = an if same else F.normalize(b, dim=-1, eps=_EPS).reshape(b.shape[0], P * H)
    out = torch.empty(N, bn.shape[0], dtype=torch.float32, device=a.device)
    step = _rows_per_chunk(bn.shape[0])
    for i in range(0, N, step):  # chunks of rows when N*M is big, each one matmul
        torch.matmul(an[i : i + step], bn.T, out=out[i : i + step])
    return out.mul_(1.0 / P).clamp_(-1.0, 1.0)


def _euclid_tok(a: Tensor, b: Tensor, same: bool) -> Tensor:
    _check_lengths(a, b, "euclid-tok")
    N, P, _ = a.shape  # batch, tokens, hidden
    M = b.shape[0]
    at, bt = a.transpose(0, 1), b.transpose(0, 1)  # [P, N, H], [P, M, H]
    a2, b2 = (at * at).sum(-1), (bt * bt).sum(-1)  # [P, N], [P, M]
    out = torch.empty(N, M, dtype=torch.float32, device=a.device)
    step = _rows_per_chunk(P * M)  # the [P, rows, M] intermediate is the big one
    for i in range(0, N, step):
        ab = torch.bmm(at[:, i : i + step], bt.transpose(1, 2))  # [P, n, M]: one batched matmul
        d2 = a2[:, i : i + step, None] + b2[:, None, :] - 2.0 * ab
        out[i : i + step] = d2.clamp_(min=0.0).sqrt_().mean(dim=0).neg_()
    if same:
        out.fill_diagonal_(0.0)
    return out


_PROMPT_METRICS: dict[str, Callable[[Tensor, Tensor, bool], Tensor]] = {
    "cos-avg": _cos_avg,
    "euclid-avg": _euclid_avg,
    "cos-tok": _cos_tok,
    "euclid-tok": _euclid_tok,
}


def pairwise(
    prompts_a: Tensor,
    prompts_b: Tensor | None = None,
    metric: str = "cos-avg",
    *,
    layers: slice | None = None,
) -> Tensor:
    """All-pairs similarity: prompts_a [N, P, H], prompts_b [M, P', H] (None: a vs a) -> [N, M].

    Higher is more similar under every metric. ``cos-*`` lie in [-1, 1] (1 on the
    diagonal of a vs a), ``euclid-*`` are minus a distance (0 on the diagonal).
    The token-wise metrics need P == P'. For ``metric="on"`` the inputs are boolean
    activation masks [N, L, F] (see :func:`capture_ffn_activations`) and ``layers``
    picks the layer window; see :func:`on_similarity`.
    Computes in float32 on the inputs' device.
    """
    check_metric(metric)
    if metric == "on":
        return on_similarity(prompts_a, prompts_b, layers=layers)
    a, b, same = _pair(prompts_a, prompts_b)
    return _PROMPT_METRICS[metric](a, b, same)


# --- activated-neuron overlap (ON) ----------------------------------------------------


def _masks(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype != torch.bool:
        got = f"{x.dtype} " if isinstance(x, Tensor) else f"{type(x).__name__} "
        raise ComposerError(
            f"{what} must be boolean activation masks [N, L, F] from capture_ffn_activations, got {got}"
            + (str(list(x.shape)) if isinstance(x, Tensor) else "")
            + " (metric 'on' compares what prompts do to the backbone, not the prompts themselves)"
        )
    if x.dim() == 2:  # one prompt's [L, F]
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ComposerError(f"{what} must have shape [N, L, F], got {list(x.shape)}")
    return x


def on_similarity(
    masks_a: Tensor,
    masks_b: Tensor | None = None,
    layers: slice | None = None,
    measure: str = "cosine",
) -> Tensor:
    """Activated-neuron overlap: masks_a [N, L, F] bool, masks_b [M, L, F] bool -> [N, M].

    Per layer l: cosine of the binary vectors, |a_l AND b_l| / sqrt(|a_l| |b_l|)
    (Su et al. 2022), or with ``measure="jaccard"`` |a_l AND b_l| / |a_l OR b_l|; then the
    mean over the layers in ``layers`` (a slice over L; None = all). A layer where
    either prompt activates nothing scores 0 (jaccard: 1 when both activate nothing).
    """
    if measure not in ("cosine", "jaccard"):
        raise ComposerError(f"unknown overlap measure {measure!r}: use 'cosine' or 'jaccard'")
    a = _masks(masks_a, "masks_a")
    b = a if masks_b is None else _masks(masks_b, "masks_b")
    if a.shape[1:] != b.shape[1:]:
        raise ComposerError(
            f"activation masks differ in shape: [L, F] = {list(a.shape[1:])} (masks_a) vs "
            f"{list(b.shape[1:])} (masks_b); capture both on the same backbone"
        )
    window = slice(None) if layers is None else layers
    if not isinstance(window, slice):
        raise ComposerError(f"layers must be a slice over the L layers, got {layers!r}")
    af = a[:, window].float().transpose(0, 1)  # [L', N, F]
    bf = b[:, window].float().transpose(0, 1)  # [L', M, F]
    L = af.shape[0]
    if L == 0:
        raise ComposerError(f"the layer window {layers} selects none of the {a.shape[1]} layers")
    inter = torch.bmm(af, bf.transpose(1, 2))  # [L', N, M]: |a AND b| per layer, one batched matmul
    na, nb = af.sum(-1), bf.sum(-1)  # [L', N], [L', M]
    if measure == "cosine":
        denom = (na[:, :, None] * nb[:, None, :]).sqrt()
        per_layer = torch.where(denom > 0, inter / denom.clamp(min=1.0), torch.zeros_like(inter))
    else:
        union = na[:, :, None] + nb[:, None, :] - inter
        per_layer = torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(inter))
    return per_layer.mean(dim=0).clamp_(0.0, 1.0)


def _matches(name: str, pattern: str | Sequence[str] | None) -> bool:
    if pattern is None:
        return re.search(FFN_PATTERN, name) is not None
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def capture_ffn_activations(
    model: torch.nn.Module,
    run: Callable[[], Any],
    layer_pattern: str | Sequence[str] | None = None,
    threshold: float = 0.5,
    positions: slice | None = None,
) -> Tensor:
    """Which FFN neurons a forward pass activates: -> [L, F] bool.

    Hooks every FFN activation module of ``model`` (by default BERT ``*.intermediate``,
    Llama ``*.mlp.act_fn``, T5 ``*.DenseReluDense.act``, GPT-2 ``*.mlp.act``; or the
    module names matching the glob(s) ``layer_pattern``), calls ``run()`` (which runs
    the model on a probe batch with one prompt; it may run several batches), and marks a
    neuron activated when its output is > 0 on more than ``threshold`` of the probe's
    tokens (over batch and tokens; ``positions`` restricts the token axis, e.g. to the
    prompt's positions). L counts the hooked modules in model order (an encoder-decoder
    has its encoder's layers, then its decoder's). Padding tokens count like the rest:
    probe with unpadded or equal-length inputs, or pass ``positions``.
    Put the model in eval mode first; this runs under no_grad.
    """
    targets = [(n, m) for n, m in model.named_modules() if n and _matches(n, layer_pattern)]
    if not targets:
        want = layer_pattern or FFN_PATTERN
        raise ComposerError(
            f"no FFN activation modules in {type(model).__name__} match {want!r}; "
            "pass layer_pattern= with the module names (see model.named_modules())"
        )
    counts: dict[str, list[Tensor | int]] = {n: [None, 0] for n, _ in targets}

    def hook(name: str):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            x = out.detach()
            if positions is not None:
                x = x[..., positions, :]  # [..., T', F]
            x = x.reshape(-1, x.shape[-1])  # [B*T, F]
            fired = (x > 0).sum(dim=0, dtype=torch.float64)  # per neuron
            acc = counts[name]
            acc[0] = fired if acc[0] is None else acc[0] + fired
            acc[1] += x.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    silent = [n for n, (fired, tokens) in counts.items() if fired is None or tokens == 0]
    if silent:
        raise ComposerError(
            f"run() did not reach {len(silent)} of the {len(targets)} hooked FFN modules "
            f"(first: {silent[0]!r}); run the model itself, or narrow layer_pattern"
        )
    sizes = {counts[n][0].shape[0] for n, _ in targets}
    if len(sizes) > 1:
        raise ComposerError(
            f"hooked FFN modules have different widths {sorted(sizes)}; narrow layer_pattern to one stack"
        )
    rows = [(counts[n][0] / counts[n][1]) > threshold for n, _ in targets]
    return torch.stack(rows).cpu()  # [L, F] bool


# --- ranking helpers ----------------------------------------------------------------


def topk(sim_row: Tensor, k: int, exclude: int | Iterable[int] | None = None) -> tuple[Tensor, Tensor]:
    """The k largest entries of sim_row [M] -> (indices [k'], values [k']), best first.

    ``exclude`` drops an index (or indices), e.g. the target itself. k' = min(k, what is
    left). Ties keep the lower index first; NaN ranks last.
    """
    k = check_top_k(k)
    row = torch.as_tensor(sim_row, dtype=torch.float32).flatten()
    keep = torch.ones_like(row, dtype=torch.bool)
    if exclude is not None:
        idx = [exclude] if isinstance(exclude, (int, np.integer)) else list(exclude)
        for i in idx:
            if not -row.numel() <= int(i) < row.numel():
                raise ComposerError(f"exclude index {i} is out of range for {row.numel()} entries")
        if idx:
            keep[torch.as_tensor(idx, dtype=torch.long)] = False
    cand = keep.nonzero().flatten()
    vals = row[cand]
    key = torch.where(torch.isnan(vals), torch.full_like(vals, -math.inf), vals)
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return cand[order], vals[order]


def spearman(x: Sequence[float] | Tensor | np.ndarray, y: Sequence[float] | Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two equal-length vectors (NaN when either is constant)."""
    from scipy.stats import spearmanr

    xa = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).ravel()
    ya = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ComposerError(f"spearman needs equal lengths, got {xa.size} and {ya.size}")
    if xa.size < 2:
        raise ComposerError(f"spearman needs at least 2 points, got {xa.size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
        return float(spearmanr(xa, ya).statistic)
