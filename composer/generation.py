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
        raise ComposerError("generation with a prefix on an encoder-decoder is not supported yet; use --kind "
                            "prompt there (decoders generate with either kind)")
    kw = {"stop_strings": list(stop), "tokenizer": pm.backbone.tokenizer} if stop else {}
    out = pm.network.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, use_cache=use_cache, num_beams=num_beams, **kw)
    start = pm.network.config.decoder_start_token_id
    return out[:, 1:] if out.shape[1] and (out[:, 0] == start).all() else out


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
    eos = eos_id(pm.backbone.tokenizer)
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
    scores = torch.zeros(B, k, device=ids.device)
    scores[:, 1:] = float("-inf")  # all beams start as one: only the first may expand at step 0
    done = torch.zeros(N, dtype=torch.bool, device=ids.device)
    tokens = torch.zeros(N, 0, dtype=torch.long, device=ids.device)
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
        logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [N, V]
        if eos is not None:  # a finished beam only extends with EOS, at no cost
            logp[done] = float("-inf")
            logp[done, eos] = 0.0
        if k == 1:
            nxt = logp.argmax(-1)
            order = torch.arange(N, device=ids.device)
        else:
            V = logp.shape[-1]
            cand = (scores.view(B, k, 1) + logp.view(B, k, V)).view(B, k * V)
            scores, flat_idx = cand.topk(k, dim=-1)  # [B, k]
            order = (torch.arange(B, device=ids.device)[:, None] * k + flat_idx // V).view(N)
            nxt = (flat_idx % V).view(N)
            tokens, done, embeds, mask = tokens[order], done[order], embeds[order], mask[order]
            if past is not None:
                past.reorder_cache(order)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if eos is not None:
            done = done | (nxt == eos)
            if stop:
                done = _stopped(pm.backbone.tokenizer, tokens, done, stop)
        step_embeds = pm.embed(nxt[:, None])  # [N, 1, H]
        embeds = torch.cat([embeds, step_embeds], 1)
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        if done.all():
            break
    if k > 1:  # the best beam of each row (beams stay sorted by score)
        tokens = tokens.view(B, k, -1)[:, 0]
    return tokens


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """The text up to its first stop string (stop strings cut the decoded text; EOS ends the decoding)."""
    for s in stop or []:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()
