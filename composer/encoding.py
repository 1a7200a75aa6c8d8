"""From task rows to token ids: template rendering, truncation that keeps the template, padding.

The template's literal text (e.g. "Question: ... Answer:") is never cut: when the rendered input is
too long, the longest input field loses tokens until the whole fits in ``max_length``.

Templates have str.format's syntax, restricted: ``{field}`` is replaced by ``str(row[field])`` (the
value is inserted as is, never re-read as a template), ``{{`` and ``}}`` are literal braces, and
format specs (``{x:>3}``), conversions (``{x!r}``), ``{}`` and ``{a.b}`` are rejected. The renderer
lives in composer/templates.py (no torch: composer.tasks validates templates with it); it is the only one.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from composer.errors import TaskError
from composer.templates import TemplateError, parse_template, render, template_fields  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def _n_tail_special(tokenizer, ids: list[int]) -> int:
    """How many special tokens end ``ids`` ([SEP] for BERT, </s> for T5, none for Llama)."""
    special, n = set(tokenizer.all_special_ids), 0
    while n < len(ids) and ids[len(ids) - 1 - n] in special:
        n += 1
    return n


def encode_row(tokenizer, template: str, row: Mapping[str, Any], max_length: int) -> list[int]:
    """One row -> token ids (special tokens included), at most ``max_length`` long."""
    ids = tokenizer(render(template, row), add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return ids
    fields = template_fields(template)
    row = {k: str(v) for k, v in row.items()}
    toks = {f: tokenizer(row[f], add_special_tokens=False)["input_ids"] for f in fields}
    for _ in range(8):  # each round cuts the longest field by the overflow; re-tokenising may shift a little
        over = len(ids) - max_length
        if over <= 0:
            return ids
        longest = max(fields, key=lambda f: len(toks[f]), default=None)
        if longest is None or not toks[longest]:
            break  # every field is already empty
        keep = max(len(toks[longest]) - over - 1, 0)
        toks[longest] = toks[longest][:keep]
        row[longest] = tokenizer.decode(toks[longest], skip_special_tokens=True)
        ids = tokenizer(render(template, row), add_special_tokens=True)["input_ids"]
    # the template alone does not fit: keep its head and the special tokens at the end
    n = _n_tail_special(tokenizer, ids)
    return ids[: max_length - n] + ids[len(ids) - n :] if 0 < n < max_length else ids[:max_length]


def encode_rows(tokenizer, template: str, rows, max_length: int) -> list[list[int]]:
    """Many rows at once: one batched tokenizer call, then the long ones are cut one by one."""
    rows = list(rows)
    if not rows:
        return []
    texts = [render(template, r) for r in rows]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [x if len(x) <= max_length else encode_row(tokenizer, template, r, max_length) for x, r in zip(ids, rows)]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad -> (input_ids [B, T], attention_mask [B, T])."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class Encoded:
    """One split, tokenised: ids[i] is a list of token ids; labels [N] and scores [N] or None (classification),
    or targets[i], the target's token ids ending in EOS, and references[i], its reference texts (generation)."""

    ids: list[list[int]]
    labels: torch.Tensor
    scores: torch.Tensor | None = None
    targets: list[list[int]] | None = None
    references: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx, pad_id: int) -> dict[str, torch.Tensor]:
        """Rows ``idx`` right-padded: input_ids, attention_mask [B, T]; labels [B]; for generation also
        targets [B, m] (padded with -100, the ignored label)."""
        idx = list(idx)
        input_ids, mask = pad_batch([self.ids[i] for i in idx], pad_id)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[idx]}
        if self.targets is not None:
            out["targets"], _ = pad_batch([self.targets[i] for i in idx], -100)
        return out

    def _take(self, idx: list[int]) -> "Encoded":
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return Encoded([self.ids[i] for i in idx], self.labels[idx],
                       self.scores[idx] if self.scores is not None else None, pick(self.targets),
                       pick(self.references))

    def subset(self, n: int | None, seed: int) -> "Encoded":
        """At most ``n`` rows, a seeded subset in the split's order (``self`` when it has no more than n)."""
        if n is not None and n < 0:
            raise ValueError(f"a subset of {n} rows: give a count >= 0 (or None for all)")
        if n is None or len(self) <= n:
            return self
        g = torch.Generator().manual_seed(seed)
        return self._take(sorted(torch.randperm(len(self), generator=g)[:n].tolist()))


def encode_split(spec, ds, tokenizer) -> Encoded:
    """A datasets.Dataset (or a list of rows) of a task split -> Encoded."""
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if not rows:
        raise TaskError(f"task '{spec.name}': the split is empty")
    check_room(spec, tokenizer)
    ids = encode_rows(tokenizer, spec.template, rows, spec.max_length)
    if getattr(spec, "is_generation", False):
        return _encode_targets(spec, rows, ids, tokenizer)
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    scores = torch.tensor([float(r["score"]) for r in rows]) if "score" in rows[0] else None
    return Encoded(ids=ids, labels=labels, scores=scores)


def template_length(tokenizer, template: str) -> int:
    """Tokens the template takes with every field empty (its literal text and the special tokens)."""
    return len(tokenizer(render(template, {f: "" for f in template_fields(template)}),
                         add_special_tokens=True)["input_ids"])


def check_room(spec, tokenizer) -> None:
    """Refuse a task whose max_length leaves no token for its input fields (every row would encode to the
    template and special tokens only, and train at chance); warn when only a few tokens are left."""
    if not template_fields(spec.template):
        return
    used, n = template_length(tokenizer, spec.template), spec.max_length
    if n - used <= 0:
        raise TaskError(f"task '{spec.name}': max_length {n} leaves no room for the input: the template and "
                        f"special tokens alone take {used} tokens; raise max_length (or shorten the template)")
    if n - used < 8:
        log.warning("task %s: max_length %d leaves %d tokens for the input fields (the template takes %d); "
                    "most rows will be cut to a few words", spec.name, n, n - used, used)


def eos_id(tokenizer) -> int | None:
    """The token that ends a target: EOS, else the separator (BERT-style vocabularies have no EOS)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _encode_targets(spec, rows: list[dict], ids: list[list[int]], tokenizer) -> Encoded:
    """A generation split: each target rendered, tokenised, cut to max_target_length, ended with EOS."""
    eos = eos_id(tokenizer)
    if eos is None:
        raise TaskError(f"task '{spec.name}' generates text, and the tokenizer has no end-of-sequence token")
    texts = [spec.render_target(r) for r in rows]
    m = int(getattr(spec, "max_target_length", 64))
    toks = tokenizer(texts, add_special_tokens=False)["input_ids"]
    targets = [t[: m - 1] + [eos] for t in toks]
    column = getattr(spec, "references", None) or "references"
    refs = [_references(r.get(column), t) for r, t in zip(rows, texts)]
    return Encoded(ids=ids, labels=torch.zeros(len(rows), dtype=torch.long), targets=targets, references=refs)


def _references(refs, target: str) -> list[str]:
    """The reference texts of a row: its references column where the data has several, else the target."""
    if isinstance(refs, (list, tuple)) and refs:
        return [str(x) for x in refs]
    return [target]
