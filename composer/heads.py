"""Scoring heads: how a prompted backbone scores a task's labels -> logits [B, C].

verbalizer        log-likelihood of each label's words (decoders, encoder-decoders); multi-token words
                  are scored token by token and summed. No task parameters.
label-similarity  cosine between the mean-pooled prompted input and each encoded label description,
                  divided by a temperature (sentence encoders such as MiniLM). No task parameters.
mlm               the masked-LM head's log-probability of each label word at a [MASK] put at the end of the
                  input, before [SEP] (LM-BFF's prompt-based classification; encoders loaded with their MLM
                  head, e.g. bert-base-uncased or roberta-base). No task parameters.
linear            a small Linear(H, C) on the pooled input; its weights are saved beside the prompt.

Each head is called as head(pm, embeds [B, T, H], mask [B, T], P) where embeds already hold the prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer.config import DEFAULT_HEAD, HEADS
from composer.encoding import pad_batch
from composer.errors import ComposerError, TaskError

__all__ = ["HEADS", "DEFAULT_HEAD", "resolve_head", "make_head", "label_descriptions", "VerbalizerHead",
           "LabelSimilarityHead", "MaskedLMHead", "LinearHead", "GenerationHead", "mean_pool", "last_token"]
# DEFAULT_HEAD is by family; an encoder loaded with its masked-LM head defaults to mlm (see resolve_head)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] -> [B, H] mean over the unmasked tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] of right-padded rows -> [B, H] at each row's last real token."""
    idx = mask.sum(1).long() - 1
    return hidden[torch.arange(len(hidden), device=hidden.device), idx]


class VerbalizerHead(nn.Module):
    """Sum of log p(label word tokens | prompt, input) per label -> [B, C]."""

    kind = "verbalizer"

    def __init__(self, label_token_ids: list[list[int]]):
        super().__init__()
        if any(len(t) == 0 for t in label_token_ids):
            raise ValueError("every label word must have at least one token")
        self.label_token_ids = [list(t) for t in label_token_ids]
        self.single = all(len(t) == 1 for t in label_token_ids)

    def forward(self, pm, embeds: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        if pm.family == "encoder-decoder":
            return self._seq2seq(pm, embeds, mask)
        if pm.family != "decoder":
            raise ValueError("the verbalizer head needs a decoder or encoder-decoder backbone")
        lm_head = pm.network.get_output_embeddings()
        if self.single:  # one pass: the next-token distribution after the input
            h = last_token(pm.hidden(embeds, mask), mask)  # [B, H]
            logp = F.log_softmax(lm_head(h).float(), dim=-1)  # [B, V]
            ids = torch.tensor([t[0] for t in self.label_token_ids], device=h.device)
            return logp[:, ids]  # [B, C]
        return self._multi_token(pm, embeds, mask, lm_head)

    def _multi_token(self, pm, embeds, mask, lm_head) -> torch.Tensor:
        B, T, H = embeds.shape
        C = len(self.label_token_ids)
        m = max(len(t) for t in self.label_token_ids)
        dev = embeds.device
        ids = torch.zeros(C, m, dtype=torch.long, device=dev)
        valid = torch.zeros(C, m, dtype=torch.bool, device=dev)
        for c, t in enumerate(self.label_token_ids):
            ids[c, : len(t)] = torch.tensor(t, device=dev)
            valid[c, : len(t)] = True
        lab = pm.embed(ids)  # [C, m, H]
        lengths = mask.sum(1).long()  # [B]
        # every (example, label) pair as one row: [B*C, T+m, H] with the label right after the input
        x = torch.cat([embeds, embeds.new_zeros(B, m, H)], 1).repeat_interleave(C, 0)
        xm = torch.cat([mask, mask.new_zeros(B, m)], 1).repeat_interleave(C, 0)
        rows = torch.arange(B * C, device=dev)[:, None]
        pos = lengths.repeat_interleave(C)[:, None] + torch.arange(m, device=dev)[None]  # [B*C, m]
        x[rows, pos] = lab.repeat(B, 1, 1)
        xm[rows, pos] = valid.repeat(B, 1).to(xm.dtype)
        hid = pm.hidden(x, xm)  # [B*C, T+m, H]
        h = hid[rows, pos - 1]  # the state before each label token predicts it: [B*C, m, H]
        logp = F.log_softmax(lm_head(h).float(), dim=-1)
        tok = logp.gather(-1, ids.repeat(B, 1)[..., None]).squeeze(-1)  # [B*C, m]
        return (tok * valid.repeat(B, 1)).sum(-1).view(B, C)

    def _seq2seq(self, pm, embeds, mask) -> torch.Tensor:
        B = embeds.shape[0]
        C = len(self.label_token_ids)
        m = max(len(t) for t in self.label_token_ids)
        dev = embeds.device
        labels = torch.full((C, m), -100, dtype=torch.long, device=dev)
        for c, t in enumerate(self.label_token_ids):
            labels[c, : len(t)] = torch.tensor(t, device=dev)
        with pm.using_prefix(None):  # a prefix sits in the decoder (below)
            enc = pm.hidden(embeds, mask)
        dec_in = pm.network.prepare_decoder_input_ids_from_labels(labels=labels)  # [C, m]
        out = pm.network(encoder_outputs=(enc.repeat_interleave(C, 0),), attention_mask=mask.repeat_interleave(C, 0),
                         decoder_input_ids=dec_in.repeat(B, 1), **pm.decoder_prefix(B * C))
        logp = F.log_softmax(out.logits.float(), dim=-1)  # [B*C, m, V]
        lab = labels.repeat(B, 1)
        tok = logp.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1)
        return (tok * (lab >= 0)).sum(-1).view(B, C)


def insert_at(embeds: torch.Tensor, mask: torch.Tensor, at: torch.Tensor,
              token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put ``token`` [H] into each right-padded row at position ``at`` [B], shifting the rest right:
    -> embeds [B, T+1, H], mask [B, T+1]."""
    B, T, H = embeds.shape
    j = torch.arange(T + 1, device=embeds.device)[None]  # [1, T+1]
    src = (j - (j > at[:, None]).long()).clamp(max=T - 1)  # [B, T+1]: which old position lands at j
    x = embeds.gather(1, src[..., None].expand(B, T + 1, H))
    m = mask.gather(1, src)
    rows = torch.arange(B, device=embeds.device)
    x[rows, at] = token.to(x.dtype)
    m[rows, at] = 1
    return x, m


class MaskedLMHead(nn.Module):
    """log p([MASK] = label word | prompt, input) per label -> [B, C] (single-token label words).

    The [MASK] goes after the input's last real token, before its closing [SEP] (or at the end when the
    tokenizer adds none). The backbone's own prediction head scores it: ``cls`` (BERT family) or
    ``lm_head`` (RoBERTa family) on the [MASK] state only; any other masked LM runs whole.
    """

    kind = "mlm"

    def __init__(self, label_token_ids: list[int], mask_token_id: int, before_sep: bool):
        super().__init__()
        self.label_token_ids = list(label_token_ids)
        self.mask_token_id = int(mask_token_id)
        self.before_sep = before_sep

    def forward(self, pm, embeds: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        at = mask.sum(1).long() - (1 if self.before_sep else 0)  # [B]
        token = pm.embed(torch.tensor([self.mask_token_id], device=embeds.device))[0]  # [H]
        x, m = insert_at(embeds, mask, at, token)
        rows = torch.arange(len(x), device=x.device)
        lm = pm.network
        head = getattr(lm, "cls", None) or getattr(lm, "lm_head", None)
        if isinstance(head, nn.Module):
            h = pm.hidden(x, m)[rows, at]  # [B, H]
            logits = head(h[:, None])[:, 0]  # [B, V]
        else:
            kw, m = pm._with_prefix(len(x), m)
            logits = lm(inputs_embeds=x, attention_mask=m, **kw).logits[rows, at]
        ids = torch.tensor(self.label_token_ids, device=logits.device)
        return F.log_softmax(logits.float(), dim=-1)[:, ids]  # [B, C]


class LabelSimilarityHead(nn.Module):
    """cos(mean-pooled prompted input, mean-pooled label description) / temperature -> [B, C].

    The descriptions are encoded by the same backbone without the prompt; with a frozen backbone
    their embeddings are computed once and cached.
    """

    kind = "label-similarity"

    def __init__(self, label_input_ids: torch.Tensor, label_mask: torch.Tensor, temperature: float = 0.05,
                 pool_prompt: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.register_buffer("label_input_ids", label_input_ids, persistent=False)
        self.register_buffer("label_mask", label_mask, persistent=False)
        self.temperature = temperature
        self.pool_prompt = pool_prompt
        self._cache: torch.Tensor | None = None
        self._params_key, self._params = None, []  # a plain list, not registered as a submodule

    def label_embeddings(self, pm) -> torch.Tensor:
        if self._params_key != id(pm.network):  # parameters() recurses through every module: ~140 us a call
            self._params_key, self._params = id(pm.network), list(pm.network.parameters())
        trainable = any(p.requires_grad for p in self._params)
        if self._cache is not None and not trainable and self._cache.device == self.label_input_ids.device:
            return self._cache
        was_training = pm.network.training
        if not trainable:  # a frozen backbone encodes the labels without dropout, once
            pm.network.eval()
        try:  # the label descriptions are encoded without the task's prefix (like without its prompt)
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()), pm.using_prefix(None):
                e = pm.embed(self.label_input_ids)
                h = mean_pool(pm.hidden(e, self.label_mask), self.label_mask)
                h = F.normalize(h.float(), dim=-1)  # [C, H]
        finally:
            pm.network.train(was_training)
        self._cache = None if trainable else h.detach()
        return h

    def forward(self, pm, embeds: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        hid = pm.hidden(embeds, mask)
        pool_mask = mask
        if not self.pool_prompt:
            start = 1 if pm.after_first else 0
            pool_mask = mask.clone()
            pool_mask[:, start : start + P] = 0
        x = F.normalize(mean_pool(hid, pool_mask).float(), dim=-1)  # [B, H]
        return x @ self.label_embeddings(pm).T / self.temperature  # [B, C]


class GenerationHead(nn.Module):
    """A generation task has no labels to score: the model is called with its targets (composer/generation.py)."""

    kind = "generation"

    def forward(self, pm, embeds: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        raise ComposerError("a generation task has no labels to score: call the model with targets=, or generate")


class LinearHead(nn.Module):
    """Linear(H, C) on the pooled input: mean (encoders, encoder side) or last token (decoders)."""

    kind = "linear"

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_labels)

    def forward(self, pm, embeds: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        hid = pm.hidden(embeds, mask)
        pooled = last_token(hid, mask) if pm.family == "decoder" else mean_pool(hid, mask)
        return self.proj(pooled.to(self.proj.weight.dtype)).float()


# -- choosing and building a task's head ------------------------------------------------------------
def resolve_head(spec, backbone, head: str | None = None) -> str:
    """The head a task gets on ``backbone`` (a Backbone): ``head``, else the spec's, else the family's default.

    Fails with one line when the head cannot work on that backbone."""
    if getattr(spec, "is_generation", False):
        if backbone.family == "encoder":
            raise ComposerError(f"task '{spec.name}' generates text, which needs a decoder or an encoder-decoder, "
                                f"and '{backbone.name}' is an encoder: use --model smollm2-135m")
        if head not in (None, "generation"):
            raise ComposerError(f"task '{spec.name}' generates text: scoring heads do not apply; drop --head {head}")
        return "generation"
    kind = head or getattr(spec, "head", None) or ("mlm" if backbone.has_mlm_head else DEFAULT_HEAD[backbone.family])
    if kind not in HEADS:
        raise ComposerError(f"unknown head '{kind}': use one of {', '.join(HEADS)}")
    if kind == "mlm" and not backbone.has_mlm_head:
        raise ComposerError(f"the mlm head needs an encoder loaded with its masked-LM head (a checkpoint whose "
                            f"config lists a *ForMaskedLM architecture, e.g. bert-base-uncased), and "
                            f"'{backbone.name}' has none: use --head label-similarity or --head linear")
    if kind == "verbalizer" and backbone.family == "encoder":
        raise ComposerError(f"the verbalizer head needs a decoder or encoder-decoder, and '{backbone.name}' is an "
                            "encoder: use --head label-similarity or --head linear")
    if kind == "label-similarity" and backbone.family != "encoder":
        raise ComposerError(f"the label-similarity head is for sentence encoders, and '{backbone.name}' is a "
                            f"{backbone.family}: use --head verbalizer or --head linear")
    return kind


def label_descriptions(spec) -> list[str]:
    descr = getattr(spec, "label_descriptions", None)
    return list(descr) if descr else [w.strip() for w in spec.label_words]


def make_head(spec, backbone, kind: str, label_temperature: float = 0.05, seed: int = 0) -> nn.Module:
    """The ``kind`` head for task ``spec`` on ``backbone`` (its tokenizer turns label words into ids)."""
    tok = backbone.tokenizer
    if kind == "generation":
        return GenerationHead()
    if kind == "verbalizer":
        ids = [tok(w, add_special_tokens=False)["input_ids"] for w in spec.label_words]
        empty = [w for w, i in zip(spec.label_words, ids) if not i]
        if empty:
            raise TaskError(f"task '{spec.name}': label words {empty} tokenise to nothing on '{backbone.name}'")
        return VerbalizerHead(ids)
    if kind == "mlm":
        ids = [tok(w, add_special_tokens=False)["input_ids"] for w in spec.label_words]
        multi = [f"{w!r} -> {len(i)} tokens" for w, i in zip(spec.label_words, ids) if len(i) != 1]
        if multi:
            raise TaskError(f"task '{spec.name}': the mlm head needs one token per label word, and on "
                            f"'{backbone.name}' {', '.join(multi)}; pick single-token label words")
        return MaskedLMHead([i[0] for i in ids], tok.mask_token_id, before_sep=tok.sep_token_id is not None)
    if kind == "label-similarity":
        seqs = tok(label_descriptions(spec), add_special_tokens=True)["input_ids"]
        ids, mask = pad_batch(seqs, tok.pad_token_id)
        return LabelSimilarityHead(ids, mask, temperature=label_temperature)
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(backbone.hidden_size, len(spec.labels))
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.02)
        head.proj.bias.zero_()
    return head
