"""Scoring a prompted model on a split: logits, probabilities and the task's metric."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from composer import metrics as M
from composer.atomic import atomic_write_text
from composer.encoding import Encoded, eos_id
from composer.generation import cut_at_stop


@torch.no_grad()
def predict(pm, enc: Encoded, batch_size: int = 64, device: torch.device | str | None = None,
            autocast=None, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """-> logits [N, C], in the split's order. Rows are batched by length to waste little padding.

    ``prompt`` [P, H] replaces the model's own prompt source (to score candidate prompts).
    """
    device = device or next(pm.parameters()).device
    was_training = pm.training
    pm.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    out: list[torch.Tensor | None] = [None] * len(enc)
    pad = pm.backbone.tokenizer.pad_token_id
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = enc.batch(idx, pad)
            ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
            with ctx:
                logits = pm(b["input_ids"].to(device), b["attention_mask"].to(device), prompt=prompt).float().cpu()
            for i, row in zip(idx, logits):
                out[i] = row
    finally:
        pm.train(was_training)
    return torch.stack(out)


def score(spec, logits: torch.Tensor, enc: Encoded) -> dict:
    """The task metric (and accuracy and loss) from logits [N, C]."""
    probs = F.softmax(logits.float(), dim=-1)
    labels = enc.labels
    loss = F.cross_entropy(logits.float(), labels).item()
    acc = (probs.argmax(-1) == labels).float().mean().item()
    scores = enc.scores.numpy() if enc.scores is not None else None
    value = M.compute(spec.metric, probs.numpy(), labels.numpy(), scores=scores)
    out = {"metric": spec.metric, "score": float(value), "accuracy": acc, "loss": loss, "n": len(enc)}
    return out


def evaluate(pm, spec, enc: Encoded, batch_size: int = 64, device=None, autocast=None,
             num_beams: int = 1, keep_predictions: bool = False) -> dict:
    """The task's metric on a split: from logits (classification) or from generated text (generation)."""
    if getattr(spec, "is_generation", False):
        return evaluate_generation(pm, spec, enc, batch_size, device, autocast, num_beams, keep_predictions)
    return score(spec, predict(pm, enc, batch_size, device, autocast), enc)


@torch.no_grad()
def generate_texts(pm, spec, enc: Encoded, batch_size: int = 32, device=None, autocast=None,
                   num_beams: int = 1, max_new_tokens: int | None = None) -> tuple[list[str], torch.Tensor]:
    """-> (each row's generated text, cut at the task's stop strings; each row's target NLL [N])."""
    device = device or next(pm.parameters()).device
    tok = pm.backbone.tokenizer
    was_training = pm.training
    pm.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    texts: list[str | None] = [None] * len(enc)
    nll = torch.zeros(len(enc))
    m = max_new_tokens or int(getattr(spec, "max_target_length", 64))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = enc.batch(idx, tok.pad_token_id)
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
            with ctx:
                if enc.targets is not None:
                    nll[idx] = pm(ids, mask, targets=b["targets"].to(device)).float().cpu()
                new = pm.generate(ids, mask, max_new_tokens=m, num_beams=num_beams, stop=getattr(spec, "stop", None))
            eos = eos_id(tok)
            for i, row in zip(idx, new.tolist()):
                if eos in row:
                    row = row[: row.index(eos)]
                texts[i] = cut_at_stop(tok.decode(row, skip_special_tokens=True), getattr(spec, "stop", None))
    finally:
        pm.train(was_training)
    return texts, nll


def evaluate_generation(pm, spec, enc: Encoded, batch_size: int = 32, device=None, autocast=None,
                        num_beams: int = 1, keep_predictions: bool = False) -> dict:
    """Generate every row, score the texts against the references with the task's metrics (the first is
    ``score``), and the mean target NLL as ``loss``."""
    texts, nll = generate_texts(pm, spec, enc, batch_size, device, autocast, num_beams)
    names = list(getattr(spec, "metrics", None) or [spec.metric])
    values = M.compute_generations(names, texts, enc.references)
    out = {"metric": names[0], "score": float(values[names[0]]), "metrics": values,
           "loss": float(nll.mean()), "n": len(enc)}
    if keep_predictions:
        out["predictions"] = [{"prediction": t, "references": r} for t, r in zip(texts, enc.references)]
    return out


def write_predictions(path, rows: list[dict]) -> None:
    """Each row's generation and references as JSON lines, written atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))


def confusion(logits: torch.Tensor, labels: torch.Tensor, C: int) -> np.ndarray:
    pred = logits.argmax(-1).numpy()
    m = np.zeros((C, C), dtype=int)
    np.add.at(m, (labels.numpy(), pred), 1)
    return m
