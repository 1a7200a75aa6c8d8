"""ATTEMPT's attentional mixture of soft prompts: one prompt per example.

AttentionComposer is pure tensor code, like composer.mixing: it knows nothing of models, tasks or files.
MixtureSource puts it in front of a backbone as a prompt source (forward(embeds, mask) -> [B, P, H]);
load_source rebuilds one from a library entry; distill_over and mean_attention read a prompted model's
mixtures over a split.
Dimension letters: K candidate prompts, P prompt tokens, H hidden size, B batch, T input tokens.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composer.errors import ComposeError
from composer.mixing import check_temperature, check_candidates

logger = logging.getLogger(__name__)

__all__ = ["AttentionComposer", "MixtureSource", "load_source", "distill_over", "mean_attention"]


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
    _OPTIONAL_KEYS = ("input_size", "num_layers")

    def __init__(
        self,
        candidates: Tensor | Sequence[Tensor],
        target_init: Tensor | None = None,
        rank: int = 32,
        temperature: float | None = None,
        dropout: float = 0.0,
        seed: int | None = None,
        input_size: int | None = None,
    ):
        super().__init__()
        stack = check_candidates(candidates).detach().float()  # [K, P, H]
        K, P, H = stack.shape
        # a prefix's rows are D-wide keys and values while the input is H-wide: down maps H_in -> rank
        self.input_size = int(input_size or H)
        if int(rank) < 1:
            raise ComposeError(f"rank (down-projection size) must be >= 1, got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ComposeError(f"dropout must be in [0, 1), got {dropout}")
        self.temperature = (check_temperature(temperature) if temperature is not None
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
        self.down = nn.Linear(self.input_size, self.rank, bias=False, device=stack.device)
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
        if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.input_size:
            raise ComposeError(
                f"input_embeds must be [B, T, H] with H = {self.input_size}, "
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
        if self.input_size != self.hidden_size:
            config["input_size"] = self.input_size
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
        unknown = sorted(set(config) - set(cls._CONFIG_KEYS) - set(cls._OPTIONAL_KEYS))
        if unknown:
            logger.warning("attention composer config: ignoring unknown keys %s (newer version?)", unknown)
        missing = [k for k in cls._TENSOR_KEYS if k not in tensors]
        if missing:
            raise ComposeError(f"attention composer tensors lack {missing}")
        K, P, H, r = (int(config[k]) for k in ("num_candidates", "prompt_length", "hidden_size", "rank"))
        H_in = int(config.get("input_size", H))
        expected = {
            "candidates": (K, P, H), "target_prompt": (P, H), "down.weight": (r, H_in),
            "up.weight": (H, r), "layer_norm.weight": (H,), "layer_norm.bias": (H,),
        }
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ComposeError(
                    f"saved tensor {key!r} has shape {list(tensors[key].shape)}, "
                    f"expected {list(shape)} from the config"
                )
        module = cls(tensors["candidates"], tensors["target_prompt"], rank=r,
                     temperature=float(config["temperature"]), dropout=float(config["dropout"]), seed=0,
                     input_size=H_in)
        with torch.no_grad():
            module.down.weight.copy_(tensors["down.weight"])
            module.up.weight.copy_(tensors["up.weight"])
            module.layer_norm.weight.copy_(tensors["layer_norm.weight"])
            module.layer_norm.bias.copy_(tensors["layer_norm.bias"])
        return module


# -- as a prompt source -------------------------------------------------------------------------------
class MixtureSource(nn.Module):
    """An AttentionComposer as a prompt source: forward(embeds [B, T, H], mask [B, T]) -> [B, P, H].

    Over prefixes (``num_layers`` set) the composer mixes their flat views [L*2*P, D] (composer/prefix.py)
    and this gives each example's prefix [B, L, 2, P, D]."""

    def __init__(self, composer: AttentionComposer, num_layers: int | None = None):
        super().__init__()
        self.composer = composer
        self.num_layers = num_layers
        self._static: Tensor | None = None

    @property
    def kind(self) -> str:
        return "prefix" if self.num_layers else "prompt"

    def _shape(self, x: Tensor) -> Tensor:
        if not self.num_layers:
            return x
        P = x.shape[-2] // (2 * self.num_layers)
        return x.reshape(*x.shape[:-2], self.num_layers, 2, P, x.shape[-1])

    def forward(self, embeds: Tensor, mask: Tensor | None = None) -> Tensor:
        prompts, _ = self.composer(embeds.float(), mask)
        return self._shape(prompts)

    def set_static(self, prompt: Tensor) -> None:
        self._static = prompt.detach()

    def static(self) -> Tensor:
        """The distilled prompt (set by distill_over) or, before that, the target prompt."""
        return self._static if self._static is not None else self._shape(self.composer.target_prompt.detach())

    def state_for_save(self):
        tensors, conf = self.composer.state_for_save()
        if self.num_layers:
            conf["num_layers"] = self.num_layers
        return tensors, conf


def load_source(entry) -> MixtureSource | None:
    """A library entry that holds an attention composer -> its MixtureSource (else None)."""
    tensors = entry.extra("composer")
    if not tensors:
        return None
    conf = (entry.meta.get("provenance") or {}).get("composer_config") or {}
    src = MixtureSource(AttentionComposer.from_saved(tensors, conf), num_layers=conf.get("num_layers"))
    src.set_static(entry.prompt)
    return src


def _embedded_batches(pm, enc, idx: list[int], batch_size: int):
    """(embeds [b, T, H] float, mask [b, T]) of rows ``idx`` of an Encoded split, on the model's device."""
    pad = pm.backbone.tokenizer.pad_token_id
    for s in range(0, len(idx), batch_size):
        b = enc.batch(idx[s : s + batch_size], pad)
        ids, mask = b["input_ids"].to(pm.device), b["attention_mask"].to(pm.device)
        yield pm.embed(ids).float(), mask


@torch.no_grad()
def distill_over(pm, enc, batch_size: int = 64, limit: int = 512) -> Tensor:
    """The mean per-example prompt of ``pm``'s MixtureSource over (up to ``limit``) rows of ``enc``: [P, H].

    It becomes the source's static prompt (what the library stores as prompt_embeddings)."""
    src = pm.prompt_source
    idx = list(range(min(len(enc), limit)))
    prompt = src._shape(src.composer.distill(list(_embedded_batches(pm, enc, idx, batch_size))))
    src.set_static(prompt)
    return prompt


@torch.no_grad()
def mean_attention(pm, enc, batch_size: int = 64) -> Tensor:
    """Attention weights of ``pm``'s MixtureSource per example: [N, K+1] (last column: the target prompt)."""
    out = [pm.prompt_source.composer(embeds, mask)[1].cpu()
           for embeds, mask in _embedded_batches(pm, enc, list(range(len(enc))), batch_size)]
    return torch.cat(out)
