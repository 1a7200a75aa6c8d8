"""Scoring a prompted model on a split: logits, probabilities and the task's metric."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from composer import metrics as M
from composer.encoding import Encoded


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


def evaluate(pm, spec, enc: Encoded, batch_size: int = 64, device=None, autocast=None) -> dict:
    return score(spec, predict(pm, enc, batch_size, device, autocast), enc)


def confusion(logits: torch.Tensor, labels: torch.Tensor, C: int) -> np.ndarray:
    pred = logits.argmax(-1).numpy()
    m = np.zeros((C, C), dtype=int)
    np.add.at(m, (labels.numpy(), pred), 1)
    return m
