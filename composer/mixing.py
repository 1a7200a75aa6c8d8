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
- ``AttentionComposer``: ATTEMPT's attentional mixture, one prompt per example.
- ``concat``: prompts of different lengths joined along P.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.errors import ComposeError

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionComposer",
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


def _check_temperature(temperature: float, what: str = "temperature") -> float:
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
        temperature = _check_temperature(temperature)
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
        if not math.isfinite(obj) or (grad is not None and not np.isfinite(grad).all()):
            history.append(math.inf)
            return math.inf, (np.zeros(K) if need_grad else None)
        history.append(obj)
        if obj < state["best_obj"]:
            state.update(best_obj=obj, best_w=x.copy(), best_loss=loss)
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
        logger.warning("optimize_linear (%s) did not converge: %s; keeping the best weights "
                       "seen (objective %.6g)", method, message, state["best_obj"])
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


# --- attention (ATTEMPT) ------------------------------------------------------------


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max over T of x [B, T, H] where mask [B, T] is nonzero -> [B, H]."""
    keep = mask.bool().unsqueeze(-1)  # [B, T, 1]
    return x.masked_fill(~keep, torch.finfo(x.dtype).min).max(dim=1).values


class AttentionComposer(nn.Module):
    """ATTEMPT's attentional mixture of soft prompts (Asai et al., EMNLP 2022).

    Per example, with input embeddings x [T, H] and mask m [T]:

        h_x  = LayerNorm(W_up SiLU(W_down maxpool_T(x)))       [H]      W_down: H -> rank
        keys = maxpool_P([c_1 .. c_K, target])                 [K+1, H]
        a    = softmax(keys @ h_x / temperature)               [K+1]
        prompt = target + sum_{j<=K+1} a_j * [c_1 .. c_K, target]_j     [P, H]

    As in ATTEMPT's T5 code (attn_method "sub" in T5Stack.forward,
    attempt/third_party/models/t5/modeling_t5.py of AkariAsai/ATTEMPT), the target prompt is one of the K+1
    attended prompts and is also added once more outside the weighted sum. Two
    departures: the max-pool over the input ignores padding (ATTEMPT pools over all
    positions, pads included) and ``dropout`` (default 0, ATTEMPT has none) acts on h_x.
    The projections have no bias and start at N(0, 0.01), as ATTEMPT initialises them;
    ``temperature`` None is ATTEMPT's H * e.

    The candidates are a frozen buffer; only the target prompt, the two projections
    and the LayerNorm train. ``target_init`` None starts the target prompt at zeros,
    so the first prompts are attention-weighted mixes of the candidates alone.
    """

    _TENSOR_KEYS = ("candidates", "target_prompt", "down.weight", "up.weight",
                    "layer_norm.weight", "layer_norm.bias")
    _CONFIG_KEYS = ("kind", "version", "num_candidates", "prompt_length", "hidden_size",
                    "rank", "temperature", "dropout")

    def __init__(
        self,
        candidates: Tensor | Sequence[Tensor],
        target_init: Tensor | None = None,
        rank: int = 32,
        temperature: float | None = None,
        dropout: float = 0.0,
        seed: int | None = None,
    ):
        super().__init__()
        stack = check_candidates(candidates).detach().float()  # [K, P, H]
        K, P, H = stack.shape
        if int(rank) < 1:
            raise ComposeError(f"rank (down-projection size) must be >= 1, got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ComposeError(f"dropout must be in [0, 1), got {dropout}")
        self.temperature = (_check_temperature(temperature) if temperature is not None
                            else float(H * math.e))
        if target_init is None:
            target = torch.zeros(P, H, device=stack.device)
        else:
            if not isinstance(target_init, Tensor) or tuple(target_init.shape) != (P, H):
                got = (list(target_init.shape) if isinstance(target_init, Tensor)
                       else type(target_init).__name__)
                raise ComposeError(f"target_init must be [P, H] = {[P, H]} like the candidates, got {got}")
            target = target_init.detach().float().clone().to(stack.device)

        self.num_candidates, self.prompt_length, self.hidden_size = K, P, H
        self.rank, self.dropout_p = int(rank), float(dropout)
        self.register_buffer("candidates", stack.clone().contiguous())  # [K, P, H], frozen
        self.target_prompt = nn.Parameter(target)  # [P, H]
        self.down = nn.Linear(H, self.rank, bias=False, device=stack.device)
        self.up = nn.Linear(self.rank, H, bias=False, device=stack.device)
        self.layer_norm = nn.LayerNorm(H, device=stack.device)
        self.dropout = nn.Dropout(self.dropout_p)
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(int(seed))
        else:
            gen.seed()
        with torch.no_grad():
            for lin in (self.down, self.up):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.01)
        self.last_weights: Tensor | None = None  # [B, K+1] from the latest forward, detached

    def attended(self) -> Tensor:
        """The K candidates followed by the target prompt: [K+1, P, H]."""
        return torch.cat([self.candidates, self.target_prompt.unsqueeze(0)], dim=0)

    def forward(self, input_embeds: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_embeds [B, T, H], attention_mask [B, T] (1 = token, 0 = pad) ->
        (prompts [B, P, H], weights [B, K+1]); weight column K is the target prompt's."""
        if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.hidden_size:
            raise ComposeError(
                f"input_embeds must be [B, T, H] with H = {self.hidden_size}, "
                f"got {list(input_embeds.shape)}"
            )
        B, T, H = input_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, device=input_embeds.device)
        if tuple(attention_mask.shape) != (B, T):
            raise ComposeError(
                f"attention_mask must be [B, T] = {[B, T]} like input_embeds, "
                f"got {list(attention_mask.shape)}"
            )
        empty = (~attention_mask.bool().any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ComposeError(f"attention_mask has no tokens in batch rows {empty}; nothing to pool")

        x = _masked_max(input_embeds.to(self.target_prompt.dtype), attention_mask)  # [B, H]
        h = self.layer_norm(self.up(F.silu(self.down(x))))  # [B, H]
        h = self.dropout(h)
        prompts_all = self.attended()  # [K+1, P, H]
        keys = prompts_all.max(dim=1).values  # [K+1, H]
        scores = h @ keys.T / self.temperature  # [B, K+1]
        a = torch.softmax(scores, dim=-1)  # [B, K+1]
        mixed = torch.einsum("bk,kph->bph", a, prompts_all)  # [B, P, H]
        prompts = mixed + self.target_prompt.unsqueeze(0)  # [B, P, H]
        self.last_weights = a.detach()
        return prompts, a

    @torch.no_grad()
    def distill(self, batches: Iterable[tuple[Tensor, Tensor | None]]) -> Tensor:
        """The mean mixed prompt over every example of the given (input_embeds [B, T, H],
        attention_mask [B, T]) batches -> [P, H]; a static prompt where one is needed.
        Runs in eval mode (no dropout) and restores the training flag."""
        was_training = self.training
        self.eval()
        try:
            total = torch.zeros(self.prompt_length, self.hidden_size,
                                dtype=torch.float64, device=self.target_prompt.device)
            n = 0
            for input_embeds, attention_mask in batches:
                prompts, _ = self(input_embeds, attention_mask)  # [B, P, H]
                total += prompts.double().sum(dim=0)
                n += prompts.shape[0]
        finally:
            self.train(was_training)
        if n == 0:
            raise ComposeError("distill needs at least one input example, got no batches")
        return (total / n).to(self.target_prompt.dtype)

    def state_for_save(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, config) for safetensors + JSON: contiguous float32 CPU tensors under
        stable keys, and the config that rebuilds the module with ``from_saved``."""
        source = {
            "candidates": self.candidates,
            "target_prompt": self.target_prompt,
            "down.weight": self.down.weight,
            "up.weight": self.up.weight,
            "layer_norm.weight": self.layer_norm.weight,
            "layer_norm.bias": self.layer_norm.bias,
        }
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in source.items()}
        config = {
            "kind": "attention",
            "version": 1,
            "num_candidates": self.num_candidates,
            "prompt_length": self.prompt_length,
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "temperature": self.temperature,
            "dropout": self.dropout_p,
        }
        return tensors, config

    @classmethod
    def from_saved(cls, tensors: dict[str, Tensor], config: dict) -> AttentionComposer:
        """Rebuild from ``state_for_save`` output; checks every key and shape it reads."""
        missing = [k for k in cls._CONFIG_KEYS if k not in config]
        if missing:
            raise ComposeError(
                f"attention composer config lacks {missing}; was it written by state_for_save?"
            )
        if config["kind"] != "attention":
            raise ComposeError(f"config kind must be 'attention', got {config['kind']!r}")
        unknown = sorted(set(config) - set(cls._CONFIG_KEYS))
        if unknown:
            logger.warning("attention composer config: ignoring unknown keys %s (newer version?)", unknown)
        missing = [k for k in cls._TENSOR_KEYS if k not in tensors]
        if missing:
            raise ComposeError(f"attention composer tensors lack {missing}")
        K, P, H, r = (int(config[k]) for k in ("num_candidates", "prompt_length", "hidden_size", "rank"))
        expected = {
            "candidates": (K, P, H), "target_prompt": (P, H), "down.weight": (r, H),
            "up.weight": (H, r), "layer_norm.weight": (H,), "layer_norm.bias": (H,),
        }
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ComposeError(
                    f"saved tensor {key!r} has shape {list(tensors[key].shape)}, "
                    f"expected {list(shape)} from the config"
                )
        module = cls(tensors["candidates"], tensors["target_prompt"], rank=r,
                     temperature=float(config["temperature"]), dropout=float(config["dropout"]), seed=0)
        with torch.no_grad():
            module.down.weight.copy_(tensors["down.weight"])
            module.up.weight.copy_(tensors["up.weight"])
            module.layer_norm.weight.copy_(tensors["layer_norm.weight"])
            module.layer_norm.bias.copy_(tensors["layer_norm.bias"])
        return module
