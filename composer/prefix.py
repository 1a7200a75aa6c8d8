"""Deep prompts (prefix tuning, P-tuning v2): per attention layer, P trainable key and value vectors.

A prefix is a tensor [L, 2, P, D]: L attention layers, key and value, P virtual tokens, D the backbone's
key/value width (kv_heads * head_dim: the hidden size H, or less where key/value heads are shared, as in
SmolLM2's grouped-query attention). It is prepended to every self-attention layer's keys and values through
the backbone's own cache (transformers' DynamicCache), exactly as PEFT's PrefixTuning does, with P ones in
front of the attention mask. Encoders and decoders take it in every layer; an encoder-decoder takes it in its
decoder's self-attention (PEFT's placement; the encoder of T5-style models reads no cache).

For the composers and the similarity metrics a prefix is a stack of per-layer prompts: ``flat`` views it as
[L*2*P, D], so everything that mixes [P, H] prompts mixes prefixes too.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from composer.errors import ComposerError

__all__ = ["Geometry", "geometry", "PrefixPrompt", "is_prefix", "flat", "unflat", "prefix_cache",
           "induced_prefix", "check_reaches"]


def cache_keyword(network: nn.Module) -> str:
    """The keyword of the key/value cache: "cache" from transformers 5.24, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(network.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class Geometry:
    """What a prefix must match: layers, key/value heads and their width."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    def describe(self) -> str:
        return f"{self.num_layers} layers x {self.kv_heads} key/value heads of {self.head_dim}"


def geometry(network: nn.Module, family: str) -> Geometry:
    """The prefix geometry of a transformers model (its decoder's, for an encoder-decoder)."""
    cfg = network.config
    if family == "encoder-decoder":
        layers = getattr(cfg, "num_decoder_layers", None) or cfg.num_hidden_layers
    else:
        layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    return Geometry(int(layers), int(kv), int(head_dim))


def is_prefix(t: torch.Tensor) -> bool:
    """A prefix [L, 2, P, D] or a batch of them [B, L, 2, P, D] (a prompt is [P, H] or [B, P, H])."""
    return t.dim() in (4, 5)


def flat(prefix: torch.Tensor) -> torch.Tensor:
    """[..., L, 2, P, D] -> [..., L*2*P, D]: the prefix as a stack of per-layer prompts."""
    return prefix.reshape(*prefix.shape[:-4], -1, prefix.shape[-1])


def unflat(x: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[..., L*2*P, D] -> [..., L, 2, P, D]."""
    P = x.shape[-2] // (2 * num_layers)
    return x.reshape(*x.shape[:-2], num_layers, 2, P, x.shape[-1])


def prefix_cache(prefix: torch.Tensor, geo: Geometry, family: str):
    """prefix [B, L, 2, P, D] -> the backbone's cache holding it (a fresh one: attention layers append to it)."""
    B, L, _, P, D = prefix.shape
    if (L, D) != (geo.num_layers, geo.kv_size):
        raise ComposerError(f"a prefix of {L} layers x width {D} does not fit a backbone of {geo.describe()} "
                            f"(width {geo.kv_size})")
    kv = prefix.view(B, L, 2, P, geo.kv_heads, geo.head_dim).transpose(3, 4)  # [B, L, 2, heads, P, hd]
    pairs = [(kv[:, i, 0], kv[:, i, 1]) for i in range(L)]
    cache = DynamicCache(pairs)
    if family == "encoder-decoder":  # the decoder's self-attention; cross-attention computes its own keys
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


class PrefixPrompt(nn.Module):
    """The prefix of one task: forward(embeds [B, T, H], mask) -> [B, L, 2, P, D].

    ``projection`` > 0 reparameterises it during training as in PEFT's prefix_projection, residually so that
    it starts exactly at ``init``: prefix = init + MLP(E), E [P, D] trainable, the MLP's last layer at zeros.
    ``static()`` folds the MLP away: what is saved is the plain [L, 2, P, D] prefix.
    """

    kind = "prefix"

    def __init__(self, init: torch.Tensor, projection: int = 0, seed: int = 0):
        super().__init__()
        if init.dim() != 4 or init.shape[1] != 2:
            raise ComposerError(f"a prefix is [L, 2, P, D], got shape {tuple(init.shape)}")
        L, _, P, D = init.shape
        self.weight = nn.Parameter(init.detach().float().contiguous().clone())
        self.projection = int(projection)
        if self.projection:
            g = torch.Generator().manual_seed(seed)
            self.embedding = nn.Parameter(torch.randn(P, D, generator=g) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(D, self.projection), nn.Tanh(), nn.Linear(self.projection, L * 2 * D))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @property
    def length(self) -> int:
        return self.weight.shape[2]

    def prefix(self) -> torch.Tensor:
        """[L, 2, P, D], through the reparameterisation when there is one."""
        if not self.projection:
            return self.weight
        L, _, P, D = self.weight.shape
        delta = self.mlp(self.embedding).view(P, L, 2, D).permute(1, 2, 0, 3)  # [L, 2, P, D]
        return self.weight + delta

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.prefix()
        return p.unsqueeze(0).expand(embeds.shape[0], *p.shape)

    def static(self) -> torch.Tensor:
        """The [L, 2, P, D] prefix to save (the reparameterisation folded in)."""
        return self.prefix().detach()


@torch.no_grad()
def induced_prefix(network: nn.Module, family: str, prompt: torch.Tensor) -> torch.Tensor:
    """The keys and values an input-level prompt [P, H] induces at every layer: [L, 2, P, D].

    The prompt runs through the backbone alone (no text), with an empty cache that every attention layer
    fills: that is the prefix which, in front of any input, the prompt's own positions would present. On an
    encoder-decoder the decoder reads the prompt as its input.
    """
    geo = geometry(network, family)
    x = prompt.to(next(network.parameters()).dtype).to(next(network.parameters()).device)[None]  # [1, P, H]
    cache = DynamicCache()
    was = network.training
    network.eval()
    try:
        if family == "encoder-decoder":
            enc = torch.zeros(1, 1, x.shape[-1], dtype=x.dtype, device=x.device)  # a blank encoder state
            dec = network.get_decoder()
            dec(inputs_embeds=x, encoder_hidden_states=enc, use_cache=True,
                **{cache_keyword(dec): EncoderDecoderCache(cache, DynamicCache())})
        else:
            network.base_model(inputs_embeds=x, use_cache=True, **{cache_keyword(network.base_model): cache})
    finally:
        network.train(was)
    if len(cache.layers) != geo.num_layers or cache.get_seq_length() != prompt.shape[0]:
        raise ComposerError("this backbone's attention does not fill a cache layer by layer, so a prefix cannot "
                            "reach it; use --kind prompt")
    ks = torch.stack([lay.keys[0] for lay in cache.layers])  # [L, heads, P, hd]
    vs = torch.stack([lay.values[0] for lay in cache.layers])
    kv = torch.stack([ks, vs], 1)  # [L, 2, heads, P, hd]
    L, _, h, P, hd = kv.shape
    return kv.transpose(2, 3).reshape(L, 2, P, h * hd).float().cpu()


@torch.no_grad()
def check_reaches(pm) -> None:
    """A prefix must change what the backbone computes: one short probe with and without it."""
    dev = pm.device
    ids = torch.tensor([[pm.backbone.tokenizer.pad_token_id or 0] * 2], device=dev)
    mask = torch.ones_like(ids)
    embeds = pm.embed(ids)
    geo = geometry(pm.network, pm.family)
    probe = torch.randn(1, geo.num_layers, 2, 1, geo.kv_size, generator=torch.Generator().manual_seed(0)).to(dev)
    probe = probe.to(embeds.dtype)

    def run(prefix):
        if pm.family != "encoder-decoder":
            return pm.run_network(embeds, mask, prefix)
        enc = pm.network.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start = torch.full((1, 1), pm.network.config.decoder_start_token_id or 0, device=dev)
        with pm.using_prefix(prefix):
            return pm.network(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=start,
                              **pm.decoder_prefix(1)).logits

    was = pm.network.training
    pm.network.eval()
    try:
        plain, with_prefix = run(None), run(probe)
    finally:
        pm.network.train(was)
    if torch.allclose(plain.float(), with_prefix.float()):
        raise ComposerError(f"a prefix does not reach the attention of '{pm.backbone.name}' "
                            f"({type(pm.network).__name__}): its layers read no cache. Supported: models whose "
                            "self-attention appends to a transformers Cache (BERT-style encoders, Llama-style "
                            "decoders, the decoder of T5-style models); use --kind prompt")
