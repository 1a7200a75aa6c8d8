"""Soft prompts: a [P, H] parameter, its initialisations, and the prepend math.

The math here is pure (tensors in, tensors out) so it is tested without a model; ``init_prompt`` turns an
``--init`` value into a starting prompt for a backbone (from its vocabulary, a text, or the library).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from composer.attention import load_source
from composer.config import INITS, KINDS
from composer.errors import ComposerError
from composer.library import Library, check_compatible
from composer.prefix import induced_prefix

log = logging.getLogger(__name__)

__all__ = ["INITS", "prepend", "random_init", "vocab_init", "text_init", "init_prompt", "SoftPrompt"]


def prepend(
    embeds: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, after_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert a prompt in front of the input embeddings.

    embeds [B, T, H], mask [B, T], prompt [P, H] or [B, P, H] -> ([B, P+T, H], [B, P+T]).
    ``after_first`` keeps the first token (BERT's [CLS]) in front: [CLS] prompt rest.
    """
    B, T, H = embeds.shape
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(B, -1, -1)  # [B, P, H]
    if prompt.shape[0] != B or prompt.shape[-1] != H:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)} does not fit inputs of shape {(B, T, H)}")
    prompt = prompt.to(embeds.dtype)
    ones = mask.new_ones(B, prompt.shape[1])
    if after_first:
        out = torch.cat([embeds[:, :1], prompt, embeds[:, 1:]], dim=1)
        out_mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    else:
        out = torch.cat([prompt, embeds], dim=1)
        out_mask = torch.cat([ones, mask], dim=1)
    return out, out_mask


def random_init(length: int, embedding: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise with the variance of the vocabulary embeddings: [P, H].

    Lester et al. draw from U(-0.5, 0.5); we match the backbone's embedding scale instead, so
    the init is neither drowned nor drowning on models whose embeddings are small (MiniLM's std is ~0.05).
    """
    std = embedding.float().std().item()
    a = math.sqrt(3.0) * std
    return (torch.rand(length, embedding.shape[1], generator=generator) * 2 - 1) * a


def vocab_init(length: int, embedding: torch.Tensor, generator: torch.Generator,
               special_ids: set[int] | None = None, top: int = 5000) -> torch.Tensor:
    """Embeddings of P token ids sampled from the first ``top`` ids (skipping specials): [P, H]."""
    V = embedding.shape[0]
    pool = torch.tensor([i for i in range(min(top, V)) if i not in (special_ids or set())])
    idx = pool[torch.randint(len(pool), (length,), generator=generator)]
    return embedding[idx].detach().float().clone()


def text_init(length: int, embedding: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Embeddings of a text's tokens, cycled or cut to P tokens: [P, H]."""
    if not token_ids:
        raise ValueError("text init needs a non-empty text")
    ids = (token_ids * (length // len(token_ids) + 1))[:length]
    return embedding[torch.tensor(ids)].detach().float().clone()


class SoftPrompt(nn.Module):
    """The prompt of one task: ``weight`` [P, H].

    forward(embeds [B, T, H], mask [B, T]) -> [B, P, H], a view (no copy). Every prompt source
    (this, or a composer that mixes prompts per example) has that signature.
    """

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().contiguous().clone())

    @property
    def length(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(embeds.shape[0], -1, -1)

    def static(self) -> torch.Tensor:
        """The [P, H] prompt to save."""
        return self.weight.detach()


def init_prompt(init: str, length: int, backbone, spec=None, seed: int = 0,
                library: Library | None = None, kind: str = "prompt") -> tuple[torch.Tensor | nn.Module, dict]:
    """-> (prompt [P, H] or prefix [L, 2, P, D], provenance).

    ``init``: random | vocab | text | text:SOME WORDS | library:NAME[@TASK]. ``backbone`` is a Backbone (its
    embeddings and tokenizer). A library entry that holds an attention composer comes back as its prompt-source
    module (a MixtureSource), to go on training as one; an MPT entry (composer/mpt.py) comes back as the module
    P* ∘ (u vᵀ), u and v at ones or (NAME@TASK, @mean, @similar) at a source's factors, all of it to train. For
    ``kind`` prefix, random, vocab and text give the keys and values that such an input-level prompt induces at
    every layer (so a prefix starts at the scale the backbone's own keys and values have), and a library prompt
    of kind ``prompt`` gives its induced prefix.
    """
    if kind not in KINDS:
        raise ComposerError(f"unknown --kind {kind!r}: use one of {', '.join(KINDS)}")
    if init.startswith("library:"):
        return _from_library(init.split(":", 1)[1], backbone, library, kind, getattr(spec, "name", None))
    emb = backbone.input_embeddings().weight.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        prompt, prov = random_init(length, emb, g), {"init": "random", "seed": seed}
    elif init == "vocab":
        specials = set(backbone.tokenizer.all_special_ids)
        prompt, prov = vocab_init(length, emb, g, specials), {"init": "vocab", "seed": seed}
    elif init == "text" or init.startswith("text:"):
        text = init[5:] if init.startswith("text:") else " ".join(w.strip() for w in (spec.label_words if spec else []))
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ComposerError(f"--init {init!r}: the text is empty; give --init text:SOME WORDS")
        prompt, prov = text_init(length, emb, ids), {"init": "text", "text": text}
    else:
        raise ComposerError(f"unknown --init {init!r}: use random, vocab, text, text:WORDS or library:NAME")
    if kind == "prefix":
        return induced_prefix(backbone.network, backbone.family, prompt), dict(prov, kind="prefix")
    return prompt, prov


def _from_library(name: str, backbone, library: Library | None, kind: str, target: str | None = None):
    name, at, pick = name.partition("@")  # NAME@TASK: a task's factors of a shared (MPT) entry
    library = library or Library()
    entry = library.load(name)
    check_compatible(entry.meta, name, backbone.name, backbone.family, backbone.hidden_size)
    if entry.meta.get("backbone") not in (None, backbone.name):
        log.warning("prompt '%s' was trained on '%s'; loading it into '%s' (same hidden size)",
                    name, entry.meta.get("backbone"), backbone.name)
    entry_kind = entry.meta.get("kind", "prompt")
    from composer.mpt import is_mpt, target_source  # lazy: composer.mpt imports the model

    if is_mpt(entry):  # the target trains P* and its own rank-1 factors (MPT's target adaptation)
        return target_source(entry, pick, kind, target)
    if at:
        raise ComposerError(f"--init library:{name}@{pick}: '@TASK' picks a task's factors of a shared (MPT) "
                            f"prompt, and '{name}' is a plain prompt; use --init library:{name}")
    source = load_source(entry)  # an attention composer continues as a module
    if source is not None:
        if entry_kind != kind:
            raise ComposerError(f"--init library:{name} holds an attention composer over {entry_kind}s; train it "
                                f"with --kind {entry_kind}")
        return source, {"init": "library", "from": name, "composer": "attention"}
    # the init's content hash: a task vector (composer.task_vectors) must not subtract an entry saved since
    prov = {"init": "library", "from": name, "from_sha": library.content_sha(name)}
    if entry_kind == kind:
        return entry.prompt.clone(), prov
    if entry_kind == "prompt":  # an input-level prompt -> the keys and values it induces
        return (induced_prefix(backbone.network, backbone.family, entry.prompt),
                dict(prov, kind="prefix", induced_from="prompt"))
    raise ComposerError(f"--init library:{name} is a prefix and this run trains a prompt: a prefix cannot be "
                        "turned back into input embeddings; use --kind prefix")
