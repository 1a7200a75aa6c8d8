"""Text-to-text with a prompted backbone: the target's negative log-likelihood, and decoding.

    target_nll(pm, embeds, mask, targets)   [B] mean NLL of each row's target tokens (the training loss)
    decode(pm, input_ids, mask, ...)        new tokens [B, N]: greedy or beam search, batched, the prompt (or
                                            prefix) in front at every step, cache on = cache off

A decoder sees input and target as one sequence (the prompt in front, the target right after each row's last
real token, the loss on the target's tokens only); an encoder-decoder reads prompt + input on the encoder side
and the target as its labels. Each row of a batch may carry its own prompt (a multi-task batch, an ATTEMPT
mixture): the prompt source gives [B, P, H] (or [B, L, 2, P, D]), and nothing here assumes one prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from composer.encoding import eos_id
from composer.errors import ComposerError
from composer.prefix import cache_keyword

__all__ = ["target_nll", "decode", "cut_at_stop"]


def target_nll(pm, embeds: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """embeds [B, T, H] (prompt included), mask [B, T], targets [B, m] (-100 = none) -> [B] mean token NLL."""
    valid = targets >= 0  # [B, m]
    if not valid.any(1).all():
        raise ComposerError("a generation row has an empty target")
    tgt = targets.clamp(min=0)
    if pm.family == "encoder-decoder":
        with pm.using_prefix(None):  # a prefix sits in the decoder (below)
            enc = pm.hidden(embeds, mask)
        dec_in = pm.network.prepare_decoder_input_ids_from_labels(labels=targets)
        logits = pm.network(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec_in,
                            **pm.decoder_prefix(len(tgt))).logits  # [B, m, V]
    elif pm.family == "decoder":
        B, T, H = embeds.shape
        m = targets.shape[1]
        rows = torch.arange(B, device=embeds.device)[:, None]
        pos = mask.sum(1).long()[:, None] + torch.arange(m, device=embeds.device)[None]  # [B, m] after the input
        x = torch.cat([embeds, embeds.new_zeros(B, m, H)], 1)
        xm = torch.cat([mask, mask.new_zeros(B, m)], 1)
        x[rows, pos] = pm.embed(tgt).to(x.dtype)
        xm[rows, pos] = valid.to(xm.dtype)
        h = pm.hidden(x, xm)[rows, pos - 1]  # the state before each target token predicts it: [B, m, H]
        logits = pm.network.get_output_embeddings()(h)
    else:
        raise ComposerError(f"generation needs a decoder or an encoder-decoder, and '{pm.backbone.name}' is an "
                            "encoder: use --model smollm2-135m (or another decoder / encoder-decoder)")
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt[..., None]).squeeze(-1)  # [B, m]
    return -(logp * valid).sum(1) / valid.sum(1)


@torch.no_grad()
def decode(pm, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 64,
           num_beams: int = 1, use_cache: bool = True, prompt: torch.Tensor | None = None,
           stop: list[str] | None = None) -> torch.Tensor:
    """New tokens [B, N] (rows that end early are filled with EOS). Greedy with ``num_beams`` 1.

    A row (a beam) also ends once its decoded text holds one of the ``stop`` strings, so decoding stops when
    every row has; the text after the stop string is still there to cut (cut_at_stop)."""
    if max_new_tokens < 1 or num_beams < 1:
        raise ComposerError(f"--max-new-tokens and --num-beams must be >= 1, got {max_new_tokens}, {num_beams}")
    if pm.family == "encoder":
        raise ComposerError(f"generation needs a decoder or an encoder-decoder, and '{pm.backbone.name}' is an "
                            "encoder: use --model smollm2-135m (or another decoder / encoder-decoder)")
    if pm.family == "encoder-decoder":
        return _seq2seq(pm, input_ids, attention_mask, max_new_tokens, num_beams, use_cache, prompt, stop)
    return _decoder(pm, input_ids, attention_mask, max_new_tokens, num_beams, use_cache, prompt, stop)


def _seq2seq(pm, input_ids, attention_mask, max_new_tokens, num_beams, use_cache, prompt, stop=None):
    embeds, mask, _, prefix = pm.prompted(input_ids, attention_mask, prompt)
    if prefix is not None:
        return _seq2seq_prefix(pm, embeds, mask, prefix, max_new_tokens, num_beams, use_cache, stop)
    kw = {"stop_strings": list(stop), "tokenizer": pm.backbone.tokenizer} if stop else {}
    out = pm.network.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, use_cache=use_cache, num_beams=num_beams, **kw)
    start = pm.network.config.decoder_start_token_id
    return out[:, 1:] if out.shape[1] and (out[:, 0] == start).all() else out


def _seq2seq_prefix(pm, embeds, mask, prefix, max_new_tokens, num_beams, use_cache, stop=None):
    """A prefix on an encoder-decoder sits in the decoder's self-attention, as in training (target_nll): the
    encoder runs once without it, then an explicit decoder loop takes the prefix in a fresh cache at its first
    step (cache on) or at every step (cache off: the whole decoded sequence again)."""
    with pm.using_prefix(None):
        enc = pm.hidden(embeds, mask)  # [B, T, H]
    B, k = enc.shape[0], num_beams
    if k > 1:  # every row's beams side by side: [B*k, ...]
        enc, mask, prefix = (t.repeat_interleave(k, 0) for t in (enc, mask, prefix))
    N = B * k
    start = pm.network.config.decoder_start_token_id
    dec = torch.full((N, 1), start, dtype=torch.long, device=enc.device)
    search = _Search(pm.backbone.tokenizer, B, k, stop, enc.device)
    key, past = cache_keyword(pm.network), None
    for _ in range(max_new_tokens):
        if use_cache and past is not None:
            out = pm.network(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, -1:],
                             use_cache=True, **{key: past})
        else:
            with pm.using_prefix(prefix):
                kw = pm.decoder_prefix(N)
            out = pm.network(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec,
                             use_cache=use_cache, **kw)
        past = out.get(key) if use_cache else None
        nxt, order = search.step(out.logits[:, -1])
        if order is not None:
            dec = dec[order]
            if past is not None:
                past.reorder_cache(order)
        dec = torch.cat([dec, nxt[:, None]], 1)
        if search.finished:
            break
    return search.best()


class _Search:
    """Greedy (k = 1) or beam search over B rows of k beams each: step(logits [B*k, V]) -> (the next token of
    each beam [B*k], how the beams were reordered [B*k] or None); the tokens so far in ``tokens``."""

    def __init__(self, tokenizer, B: int, k: int, stop: list[str] | None, device):
        self.tokenizer, self.B, self.k, self.stop = tokenizer, B, k, stop
        self.eos = eos_id(tokenizer)
        N = B * k
        self.scores = torch.zeros(B, k, device=device)
        self.scores[:, 1:] = float("-inf")  # all beams start as one: only the first may expand at step 0
        self.done = torch.zeros(N, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(N, 0, dtype=torch.long, device=device)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, k, eos = self.B, self.k, self.eos
        logp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
        if eos is not None:  # a finished beam only extends with EOS, at no cost
            logp[self.done] = float("-inf")
            logp[self.done, eos] = 0.0
        order = None
        if k == 1:
            nxt = logp.argmax(-1)
        else:
            V = logp.shape[-1]
            cand = (self.scores.view(B, k, 1) + logp.view(B, k, V)).view(B, k * V)
            self.scores, flat_idx = cand.topk(k, dim=-1)  # [B, k]
            order = (torch.arange(B, device=logits.device)[:, None] * k + flat_idx // V).view(B * k)
            nxt = (flat_idx % V).view(B * k)
            self.tokens, self.done = self.tokens[order], self.done[order]
        self.tokens = torch.cat([self.tokens, nxt[:, None]], 1)
        if eos is not None:
            self.done = self.done | (nxt == eos)
            if self.stop:
                self.done = _stopped(self.tokenizer, self.tokens, self.done, self.stop)
        return nxt, order

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def best(self) -> torch.Tensor:
        """[B, n]: each row's tokens (its best beam's: beams stay sorted by score)."""
        return self.tokens.view(self.B, self.k, -1)[:, 0] if self.k > 1 else self.tokens


def _stopped(tokenizer, tokens: torch.Tensor, done: torch.Tensor, stop: list[str]) -> torch.Tensor:
    """done, and also every row whose decoded tokens hold a stop string."""
    out = done.clone()
    for n in (~done).nonzero().flatten().tolist():
        text = tokenizer.decode(tokens[n].tolist(), skip_special_tokens=True)
        out[n] = any(s in text for s in stop)
    return out


def _decoder(pm, input_ids, attention_mask, max_new_tokens, num_beams, use_cache, prompt, stop=None):
    """An explicit loop over the decoder: left-align the rows, put the prompt (or prefix) in front, then one
    token a step for every beam of every row."""
    B, T = input_ids.shape
    shift = (T - attention_mask.sum(1)).tolist()  # left-align: every row's last token at the end
    ids = torch.stack([torch.roll(row, s) for row, s in zip(input_ids, shift)])
    am = torch.stack([torch.roll(row, s) for row, s in zip(attention_mask, shift)])
    embeds, mask, _, prefix = pm.prompted(ids, am, prompt)
    P = 0 if prefix is None else prefix.shape[3]
    if prefix is not None:  # the prefix's P positions count in the mask (and so in the positions)
        mask = torch.cat([mask.new_ones(B, P), mask], 1)
    k = num_beams
    if k > 1:  # every row's beams side by side: [B*k, ...]
        embeds, mask = embeds.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        prefix = None if prefix is None else prefix.repeat_interleave(k, 0)
    N = B * k
    key = cache_keyword(pm.network)
    search = _Search(pm.backbone.tokenizer, B, k, stop, ids.device)
    past, step_embeds = None, embeds
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # the text's positions
        if use_cache and past is not None:
            out = pm.network(inputs_embeds=step_embeds, attention_mask=mask, position_ids=pos[:, -1:],
                             use_cache=True, **{key: past})
        else:  # the whole sequence again; a prefix comes in a fresh cache each time
            with pm.using_prefix(prefix):
                kw, _ = pm._with_prefix(N, None)
            out = pm.network(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=use_cache, **kw)
        past = out.get(key) if use_cache else None
        nxt, order = search.step(out.logits[:, -1])
        if order is not None:
            embeds, mask = embeds[order], mask[order]
            if past is not None:
                past.reorder_cache(order)
        step_embeds = pm.embed(nxt[:, None])  # [N, 1, H]
        embeds = torch.cat([embeds, step_embeds], 1)
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        if search.finished:
            break
    return search.best()


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The text up to its first stop string (stop strings cut the decoded text; EOS ends the decoding)."""
    for s in stop or []:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()
