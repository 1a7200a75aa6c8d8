"""Put the pieces together: a task's encoded data, its head, and a prompt for a backbone."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from composer.backbones import Backbone
from composer.encoding import encode_rows, pad_batch
from composer.errors import ComposerError, LibraryError, TaskError
from composer.heads import DEFAULT_HEAD, HEADS, LabelSimilarityHead, LinearHead, MaskedLMHead, VerbalizerHead
from composer.library import Library, check_compatible
from composer.model import PromptedModel
from composer.prompts import SoftPrompt, random_init, text_init, vocab_init

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One split, tokenised: ids[i] is a list of token ids, labels [N], scores [N] or None."""

    ids: list[list[int]]
    labels: torch.Tensor
    scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx, pad_id: int) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_batch([self.ids[i] for i in idx], pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[list(idx)]}


def encode_split(spec, ds, tokenizer) -> Encoded:
    """A datasets.Dataset of a task split -> Encoded."""
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if not rows:
        raise TaskError(f"task '{spec.name}': the split is empty")
    ids = encode_rows(tokenizer, spec.template, rows, spec.max_length)
    labels = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    scores = torch.tensor([float(r["score"]) for r in rows]) if "score" in rows[0] else None
    return Encoded(ids=ids, labels=labels, scores=scores)


def resolve_head(spec, backbone: Backbone, head: str | None = None) -> str:
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


def make_head(spec, backbone: Backbone, kind: str, temperature: float = 0.05, seed: int = 0) -> nn.Module:
    tok = backbone.tokenizer
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
        return LabelSimilarityHead(ids, mask, temperature=temperature)
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(backbone.hidden_size, len(spec.labels))
    with torch.no_grad():
        head.proj.weight.copy_(torch.randn(head.proj.weight.shape, generator=g) * 0.02)
        head.proj.bias.zero_()
    return head


def init_prompt(init: str, length: int, backbone: Backbone, spec=None, seed: int = 0,
                library: Library | None = None) -> tuple[torch.Tensor | nn.Module, dict]:
    """-> (prompt [P, H], provenance). ``init``: random | vocab | text | text:SOME WORDS | library:NAME.

    A library entry that holds an attention composer comes back as its prompt-source module.
    """
    emb = backbone.input_embeddings().weight.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        return random_init(length, emb, g), {"init": "random", "seed": seed}
    if init == "vocab":
        specials = set(backbone.tokenizer.all_special_ids)
        return vocab_init(length, emb, g, specials), {"init": "vocab", "seed": seed}
    if init == "text" or init.startswith("text:"):
        text = init[5:] if init.startswith("text:") else " ".join(w.strip() for w in (spec.label_words if spec else []))
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ComposerError(f"--init {init!r}: the text is empty; give --init text:SOME WORDS")
        return text_init(length, emb, ids), {"init": "text", "text": text}
    if init.startswith("library:"):
        name = init.split(":", 1)[1]
        entry = (library or Library()).load(name)
        check_compatible(entry.meta, name, backbone.name, backbone.family, backbone.hidden_size)
        if entry.meta.get("backbone") not in (None, backbone.name):
            log.warning("prompt '%s' was trained on '%s'; loading it into '%s' (same hidden size)",
                        name, entry.meta.get("backbone"), backbone.name)
        from composer.compose import load_source

        source = load_source(entry)  # an attention composer continues as a module
        if source is not None:
            return source, {"init": "library", "from": name, "composer": "attention"}
        return entry.prompt.clone(), {"init": "library", "from": name}
    raise ComposerError(f"unknown --init {init!r}: use random, vocab, text, text:WORDS or library:NAME")


def build_model(backbone: Backbone, spec, prompt: torch.Tensor | nn.Module, head: str | None = None,
                temperature: float = 0.05, seed: int = 0) -> PromptedModel:
    """A PromptedModel for one task. ``prompt`` is a [P, H] tensor or a prompt-source module."""
    kind = resolve_head(spec, backbone, head)
    source = prompt if isinstance(prompt, nn.Module) else SoftPrompt(prompt)
    if isinstance(prompt, torch.Tensor) and prompt.shape[-1] != backbone.hidden_size:
        raise LibraryError(f"prompt of hidden size {prompt.shape[-1]} does not fit backbone '{backbone.name}' "
                           f"of hidden size {backbone.hidden_size}")
    pm = PromptedModel(backbone, source, make_head(spec, backbone, kind, temperature=temperature, seed=seed))
    return pm.to(pm.device)  # prompt and head live where the backbone is


def freeze_backbone(pm: PromptedModel) -> None:
    for p in pm.backbone.parameters():
        p.requires_grad_(False)


def trained_label_temperature(meta: dict, default: float = 0.05) -> float:
    """The label-similarity temperature a library prompt was trained with (its run's config), else ``default``.

    Single-task runs before label_temperature was its name wrote it as ``temperature``; in a multi-task run's
    config ``temperature`` is the task-sampling temperature, so it never counts there."""
    conf = meta.get("config") or {}
    t = conf.get("label_temperature")
    if t is None and "task" in conf:
        t = conf.get("temperature")
    return float(t) if t is not None else default


def from_library(entry, backbone: Backbone, spec, head: str | None = None,
                 temperature: float | None = None) -> PromptedModel:
    """A PromptedModel for ``spec`` with a library prompt (its head weights when it was trained on that task,
    its backbone delta when it was tuned jointly). ``temperature`` (label-similarity head) defaults to the one
    the prompt was trained with."""
    if temperature is None:
        temperature = trained_label_temperature(entry.meta)
    check_compatible(entry.meta, entry.name, backbone.name, backbone.family, backbone.hidden_size)
    same_task = entry.meta.get("task") == spec.name
    kind = head or (entry.meta.get("head") if same_task else None)
    from composer.compose import load_source

    pm = build_model(backbone, spec, load_source(entry) or entry.prompt, head=kind, temperature=temperature)
    head_state = entry.extra("head")
    if head_state and same_task and pm.head.kind == "linear":
        pm.head.proj.load_state_dict({k.split(".", 1)[1]: v for k, v in head_state.items()})
    delta = entry.extra("backbone")
    if delta:
        missing = set(delta) - set(dict(pm.backbone.named_parameters()))
        if missing:
            raise LibraryError(f"prompt '{entry.name}' holds backbone weights '{sorted(missing)[0]}' that "
                               f"'{backbone.name}' lacks; load it with the backbone it was tuned on "
                               f"('{entry.meta.get('backbone')}')")
        pm.backbone.load_state_dict(delta, strict=False)
    return pm
