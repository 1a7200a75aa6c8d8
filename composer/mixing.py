"""Composition math: turn candidate prompts [K, P, H] into a target prompt.

Pure functions over tensors plus callables; nothing here knows about models, tasks or
files. Dimension letters: K candidate prompts, P prompt tokens, H hidden size,
B batch, T input tokens.

- ``best`` / ``pick_best``: keep the candidate with the highest score.
- ``average``: similarity-weighted average (SPoT), softmax with a temperature or
  weights normalised by their sum.
- ``combine`` / ``optimize_linear``: a linear combination sum_k w_k c_k whose weights
  are fitted on a few target examples with scipy (L-BFGS-B through torch autograd, or
  gradient-free Powell / Nelder-Mead as LoraHub does), with an L1 penalty.
- ATTEMPT's attentional mixture, one prompt per example, is ``composer.attention``; it
  shares this module's boundary checks.
- ``concat``: prompts of different lengths joined along P.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from composer.errors import ComposeError

logger = logging.getLogger(__name__)

__all__ = [
    "LinearResult",
    "average",
    "best",
    "check_candidates",
    "combine",
    "concat",
    "optimize_linear",
    "pick_best",
]


# --- checks at the boundary ------------------------------------------------------


def _label(i: int, names: Sequence[str] | None) -> str:
    return f"{names[i]!r} (#{i})" if names is not None else f"#{i}"


def check_temperature(temperature: float, what: str = "temperature") -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ComposeError(f"{what} must be a finite number > 0, got {temperature!r}")
    return t


def check_candidates(
    candidates: Tensor | Sequence[Tensor], names: Sequence[str] | None = None
) -> Tensor:
    """Validate candidate prompts and stack them: a [K, P, H] tensor or K tensors [P, H].

    Raises ComposeError when there are none (K == 0), when one is not [P, H], or when
    their prompt length P or hidden size H differ; the message names the candidates
    (``names`` when given, else their indices) and both shapes.
    """
    if isinstance(candidates, Tensor):
        if candidates.dim() != 3:
            raise ComposeError(
                f"candidates must be a [K, P, H] tensor, got shape {list(candidates.shape)}"
            )
        items = list(candidates)
    else:
        items = list(candidates)
    if len(items) == 0:
        raise ComposeError(
            "no candidate prompts (K == 0): the target needs at least one subtask or source prompt"
        )
    if names is not None and len(names) != len(items):
        raise ComposeError(f"got {len(names)} names for {len(items)} candidate prompts")
    for i, c in enumerate(items):
        if not isinstance(c, Tensor) or c.dim() != 2:
            shape = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ComposeError(
                f"candidate {_label(i, names)} must be a [P, H] tensor, got {shape}"
            )
    first = items[0].shape
    for i, c in enumerate(items[1:], start=1):
        if c.shape != first:
            what = "hidden size H" if c.shape[1] != first[1] else "prompt length P"
            raise ComposeError(
                f"candidate prompts differ in {what}: {_label(0, names)} is {list(first)} "
                f"but {_label(i, names)} is {list(c.shape)}; all need the same [P, H] "
                "(only concat joins prompts of different lengths)"
            )
    if isinstance(candidates, Tensor):
        return candidates
    return torch.stack(items)


def _check_weights(weights, k: int, what: str = "weights") -> Tensor:
    w = torch.as_tensor(weights)
    if w.dim() != 1 or w.shape[0] != k:
        raise ComposeError(f"{what} must be [K] = [{k}], got shape {list(w.shape)}")
    if not torch.isfinite(w.double()).all():
        raise ComposeError(f"{what} must be finite, got {w.tolist()}")
    return w


# --- best --------------------------------------------------------------------------


def best(scores: Sequence[float]) -> int:
    """Index of the highest score (higher is better: pass -loss for a loss).

    NaN scores never win; ties go to the first. Raises ComposeError when there are no
    scores or all of them are NaN.
    """
    s = np.asarray(list(scores), dtype=np.float64)
    if s.size == 0:
        raise ComposeError("no scores to pick from (K == 0)")
    if np.isnan(s).all():
        raise ComposeError(f"every candidate scored NaN: {s.tolist()}")
    return int(np.argmax(np.where(np.isnan(s), -np.inf, s)))


def pick_best(
    candidates: Tensor | Sequence[Tensor], score_fn: Callable[[Tensor], float]
) -> tuple[int, list[float]]:
    """Score each candidate [P, H] with ``score_fn`` (higher is better); return (index, scores)."""
    stack = check_candidates(candidates)  # [K, P, H]
    scores = [float(score_fn(c)) for c in stack]
    return best(scores), scores


# --- average (SPoT) -------------------------------------------------------------------


def average(
    candidates: Tensor | Sequence[Tensor],
    weights: Tensor | Sequence[float] | None = None,
    temperature: float | None = None,
    normalise: str = "softmax",
) -> tuple[Tensor, Tensor]:
    """Similarity-weighted average of candidates [K, P, H] -> (prompt [P, H], weights [K]).

    ``weights`` [K] are raw scores, typically the similarity of each candidate to the
    target; None gives the uniform average. ``normalise``:

    - "softmax": softmax(weights / temperature); temperature None means 1. A high
      temperature tends to the uniform average, a low one to the most similar candidate.
    - "sum": weights / sum(weights). Negative weights are clipped to 0 first (a
      negative similarity means "not related", not "subtract"), with a log warning;
      the temperature is not used. All-zero weights after clipping are an error.

    The returned weights sum to one; the average of identical prompts is that prompt.
    """
    stack = check_candidates(candidates)  # [K, P, H]
    K = stack.shape[0]
    if temperature is not None:
        temperature = check_temperature(temperature)
    if normalise not in ("softmax", "sum"):
        raise ComposeError(f"normalise must be 'softmax' or 'sum', got {normalise!r}")
    if weights is None:
        w = torch.full((K,), 1.0 / K, dtype=stack.dtype, device=stack.device)
    else:
        raw = _check_weights(weights, K).to(device=stack.device, dtype=torch.float64)
        if normalise == "softmax":
            w = torch.softmax(raw / (temperature or 1.0), dim=0)
        else:
            if (raw < 0).any():
                logger.warning("average: clipping negative weights %s to 0", raw.tolist())
            raw = raw.clamp(min=0)
            if raw.sum() <= 0:
                raise ComposeError(
                    "weights sum to 0 after clipping negatives, so they cannot be "
                    "normalised; use normalise='softmax' or give a positive weight"
                )
            w = raw / raw.sum()
        w = w.to(stack.dtype)
    prompt = torch.einsum("k,kph->ph", w, stack)  # [P, H]
    return prompt, w


# --- concat ---------------------------------------------------------------------------


def concat(candidates: Sequence[Tensor]) -> Tensor:
    """Join prompts [P_i, H] along P, in the given order -> [sum P_i, H]."""
    items = list(candidates)
    if not items:
        raise ComposeError("no prompts to concatenate (K == 0)")
    for i, c in enumerate(items):
        if not isinstance(c, Tensor) or c.dim() != 2:
            shape = list(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ComposeError(f"prompt #{i} must be a [P, H] tensor, got {shape}")
    hidden = {c.shape[1] for c in items}
    if len(hidden) > 1:
        shapes = ", ".join(f"#{i} {list(c.shape)}" for i, c in enumerate(items))
        raise ComposeError(
            f"cannot concatenate prompts of different hidden sizes H: {shapes}; "
            "all must come from the same backbone"
        )
    return torch.cat(items, dim=0)


# --- linear combination (LoraHub-style) --------------------------------------------


def combine(weights: Tensor | Sequence[float] | np.ndarray, candidates: Tensor) -> Tensor:
    """sum_k w_k * c_k: weights [K], candidates [K, P, H] -> [P, H].

    Differentiable in ``weights`` when it is a tensor that requires grad.
    """
    stack = check_candidates(candidates)
    w = _check_weights(weights, stack.shape[0]).to(device=stack.device, dtype=stack.dtype)
    return torch.einsum("k,kph->ph", w, stack)


@dataclass
class LinearResult:
    """What ``optimize_linear`` found: always the best weights seen over all evaluations."""

    weights: np.ndarray
    """[K] the best weights seen (clipped into bounds)."""
    loss: float
    """loss_fn at ``weights``, without the L1 penalty."""
    objective: float
    """loss + l1 * |weights|_1: what was minimised."""
    n_evals: int
    """How many times loss_fn was called."""
    converged: bool
    """False when scipy reported failure or the optimizer raised; the weights are still the best seen."""
    message: str
    """scipy's message, or the exception that stopped the run."""
    history: list[float] = field(default_factory=list)
    """The objective at every evaluation, in order (inf where the loss was NaN or inf)."""
    method: str = "lbfgs"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = [float(x) for x in self.weights]
        return d


_METHODS = {"lbfgs": "L-BFGS-B", "powell": "Powell", "nelder-mead": "Nelder-Mead"}


def _not_converged_note(method: str, message: str, n_evals: int, best_obj: float) -> str:
    """Why the optimizer stopped, and why the weights it returns are still the ones to use."""
    why = ""
    if method == "lbfgs" and "ABNORMAL" in message:
        why = (" (its line search found no lower point along the last direction: the L1 penalty has a kink "
               "at zero and the loss is measured on a few shots, so this is where L-BFGS-B usually stops)")
    return (f"linear composition ({method}) stopped before its convergence test held: {message}{why}; "
            f"the weights kept are the best of its {n_evals} evaluations (objective {best_obj:.6g}), "
            f"the same rule as when it converges, so they are fine to use")


def optimize_linear(
    candidates: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Tensor], Tensor | float],
    method: str = "lbfgs",
    l1: float = 0.05,
    bounds: tuple[float, float] = (-1.5, 1.5),
    init: Sequence[float] | np.ndarray | None = None,
    max_iter: int = 100,
    max_evals: int | None = None,
    seed: int | None = 0,
    on_eval: Callable[[int, float], None] | None = None,
) -> LinearResult:
    """Fit weights w [K] so that loss_fn(combine(w, candidates)) + l1 * |w|_1 is small.

    candidates [K, P, H] are fixed; loss_fn takes a prompt [P, H] and returns a scalar.

    - "lbfgs": scipy L-BFGS-B with box bounds; the loss gradient comes from torch
      autograd (w is a leaf tensor), the L1 term's from its subgradient l1 * sign(w).
      loss_fn must return a tensor connected to its input.
    - "powell" (bounded) and "nelder-mead" (w clipped into bounds inside the
      objective): gradient-free, as LoraHub does; loss_fn may return a float. Run
      under torch.no_grad.

    ``init`` None starts from the uniform average 1/K. ``max_iter`` caps the
    optimizer's iterations, ``max_evals`` its loss evaluations (scipy's default when
    None). With ``seed`` not None, every evaluation runs with the torch CPU RNG (and
    that of the candidates' CUDA device) seeded to it, so a loss with dropout or
    sampling is the same function at every call; the global RNG state is restored.
    ``on_eval(n, best)`` is called after every evaluation with the count so far and the
    best objective yet (a progress bar's hook).

    A NaN or inf objective is shown to the optimizer as +inf. The best weights seen
    over all evaluations are kept: if scipy fails or loss_fn raises, they are returned
    with converged=False and the reason in ``message``. Only when no evaluation gave a
    finite loss is there nothing to keep, and that raises ComposeError.
    """
    stack = check_candidates(candidates).detach()  # [K, P, H]
    K = stack.shape[0]
    if method not in _METHODS:
        raise ComposeError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    l1 = float(l1)
    if not math.isfinite(l1) or l1 < 0:
        raise ComposeError(f"l1 must be a finite number >= 0, got {l1!r}")
    lo, hi = (float(b) for b in bounds)
    if not lo < hi:
        raise ComposeError(f"bounds must be (low, high) with low < high, got {tuple(bounds)!r}")
    if max_iter < 1:
        raise ComposeError(f"max_iter must be >= 1, got {max_iter}")
    x0 = np.full(K, 1.0 / K) if init is None else _check_weights(init, K, "init").double().numpy()
    x0 = np.clip(x0, lo, hi)

    rng_devices = [stack.device.index or 0] if stack.device.type == "cuda" else []
    state = {"n": 0, "best_obj": math.inf, "best_w": None, "best_loss": math.nan}
    history: list[float] = []

    def evaluate(x: np.ndarray, need_grad: bool) -> tuple[float, np.ndarray | None]:
        x = np.clip(np.asarray(x, dtype=np.float64), lo, hi)
        w = torch.tensor(x, dtype=stack.dtype, device=stack.device, requires_grad=need_grad)
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            with torch.set_grad_enabled(need_grad):
                out = loss_fn(combine(w, stack))
        state["n"] += 1
        if need_grad and not (isinstance(out, Tensor) and out.requires_grad):
            raise ComposeError(
                "loss_fn must return a scalar tensor computed from its prompt for "
                "method='lbfgs'; use method='powell' or 'nelder-mead' for a black-box loss"
            )
        if isinstance(out, Tensor) and out.numel() != 1:
            raise ComposeError(f"loss_fn must return a scalar, got shape {list(out.shape)}")
        loss = float(out.detach()) if isinstance(out, Tensor) else float(out)
        grad = None
        if need_grad:
            (g,) = torch.autograd.grad(out.reshape(()), w)
            grad = g.double().cpu().numpy() + l1 * np.sign(x)
        obj = loss + l1 * float(np.abs(x).sum())
        finite = math.isfinite(obj) and (grad is None or np.isfinite(grad).all())
        history.append(obj if finite else math.inf)
        if finite and obj < state["best_obj"]:
            state.update(best_obj=obj, best_w=x.copy(), best_loss=loss)
        if on_eval is not None:
            on_eval(state["n"], state["best_obj"])
        if not finite:
            return math.inf, (np.zeros(K) if need_grad else None)
        return obj, grad

    options: dict = {"maxiter": int(max_iter)}
    if method == "lbfgs":
        if max_evals is not None:
            options["maxfun"] = int(max_evals)
        kwargs = dict(jac=True, bounds=[(lo, hi)] * K)
        fun = lambda x: evaluate(x, need_grad=True)  # noqa: E731
    else:
        if max_evals is not None:
            options["maxfev"] = int(max_evals)
        kwargs = dict(bounds=[(lo, hi)] * K) if method == "powell" else {}
        fun = lambda x: evaluate(x, need_grad=False)[0]  # noqa: E731

    try:
        res = scipy.optimize.minimize(fun, x0, method=_METHODS[method], options=options, **kwargs)
        converged, message = bool(res.success), str(res.message)
        if converged and not math.isfinite(float(res.fun)):
            # e.g. L-BFGS-B stopping at a NaN point whose (zeroed) gradient looks flat
            converged, message = False, f"{message}; but the final objective is not finite"
    except ComposeError:
        raise
    except Exception as exc:  # keep what was found so far, whatever stopped the optimizer
        converged, message = False, f"optimizer stopped: {type(exc).__name__}: {exc}"
    if state["best_w"] is None:
        raise ComposeError(
            f"linear composition found no finite loss in {state['n']} evaluations "
            f"(method {method!r}): {message}; check loss_fn on the uniform average"
        )
    if not converged:
        logger.warning("%s", _not_converged_note(method, message, state["n"], state["best_obj"]))
    return LinearResult(
        weights=state["best_w"],
        loss=state["best_loss"],
        objective=state["best_obj"],
        n_evals=state["n"],
        converged=converged,
        message=message,
        history=history,
        method=method,
    )
