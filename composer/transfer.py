"""Relating library prompts: similarity matrices, zero-shot transfer, and linking a graph from them.

    similarity_matrix(library, names, metric)      -> [N, N] (cos-avg, cos-tok, euclid-*, on)
    transfer_matrix(library, prompts, tasks)       -> [N_prompts, N_tasks] zero-shot dev scores
    link_graph(G, library, metric, top_k)          -> similar edges source -> target, written onto G

The math lives in composer/similarity.py; this module loads prompts and backbones around it.
"""
from __future__ import annotations

import logging

import torch

from composer import graph as G_
from composer.backbones import Backbone, load_backbone
from composer.config import LINK_METRICS
from composer.encoding import Encoded, encode_split, pad_batch
from composer.errors import ComposerError, LibraryError
from composer.evaluate import evaluate
from composer.library import Library
from composer.model import build_model, from_library
from composer.prefix import flat, is_prefix
from composer.similarity import capture_ffn_activations, check_metric, pairwise
from composer.suite import generate
from composer.taskdata import load_splits
from composer.tasks import load_task

log = logging.getLogger(__name__)



def _load(library: Library, names: list[str]):
    entries = [library.load(n) for n in names]
    sizes = {e.name: e.meta.get("hidden_size") for e in entries}
    if len(set(sizes.values())) > 1:
        raise LibraryError("prompts of different hidden size cannot be compared: "
                           + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    kinds = {e.name: e.meta.get("kind", "prompt") for e in entries}
    if len(set(kinds.values())) > 1:
        raise LibraryError("prompts and prefixes cannot be compared with each other: "
                           + ", ".join(f"{k}={v}" for k, v in kinds.items()))
    return entries


def probe_batch(backbone: Backbone, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of built-in suite sentences (offline, deterministic): ids [n, T], mask [n, T]."""
    rows = generate("negated-polarity", "dev")[: n // 2] + generate("topic", "dev")[: n - n // 2]
    ids = backbone.tokenizer([r["sentence"] for r in rows], add_special_tokens=True)["input_ids"]
    return pad_batch(ids, backbone.tokenizer.pad_token_id)


@torch.no_grad()
def activation_masks(entries, backbone: Backbone, probe: tuple[torch.Tensor, torch.Tensor] | None = None,
                     threshold: float = 0.5) -> torch.Tensor:
    """Which FFN neurons each prompt activates on the probe, at the prompt's positions: [N, L, F] bool.

    Su et al. (2022) read activations at the prompt tokens; here the prompt sits in front of a fixed
    probe batch so its tokens see real inputs, as they do in use.
    """
    import types

    ids, mask = probe or probe_batch(backbone)
    spec = types.SimpleNamespace(name="probe", labels=["a"], label_words=[" a"], label_descriptions=["a"], head=None)
    out = []
    for e in entries:
        pm = build_model(backbone, spec, e.prompt, head="linear")
        pm.eval()
        start = 1 if pm.after_first else 0
        # a prefix has no positions of its own: it shows in how the probe's own tokens activate
        positions = slice(None) if is_prefix(e.prompt) else slice(start, start + e.prompt.shape[0])

        def run(pm=pm):
            embeds, m, _, prefix = pm.prompted(ids.to(pm.device), mask.to(pm.device))
            pm.run_network(embeds, m, prefix)

        out.append(capture_ffn_activations(pm.network, run, threshold=threshold, positions=positions))
    return torch.stack(out)


def similarity_matrix(library: Library, names: list[str], metric: str = "cos-avg",
                      backbone: Backbone | None = None, others: list[str] | None = None,
                      device: str = "cpu") -> torch.Tensor:
    """[N, M] similarity of the prompts ``names`` to ``others`` (default: to themselves)."""
    check_metric(metric)
    a = _load(library, names)
    b = _load(library, others) if others is not None else a
    if metric == "on":
        bbs = {e.meta.get("backbone") for e in a + b}
        if backbone is None:
            if len(bbs) != 1 or None in bbs:
                raise ComposerError(f"the 'on' metric runs the backbone; these prompts come from {sorted(map(str, bbs))}: "
                                    "pass --model")
            backbone = load_backbone(bbs.pop(), device=device)
        ma = activation_masks(a, backbone)
        mb = activation_masks(b, backbone) if others is not None else None
        return pairwise(ma, mb, metric="on")
    pa = _stack(a, metric)
    pb = _stack(b, metric) if others is not None else None
    return pairwise(pa, pb, metric=metric)


def _stack(entries, metric: str) -> torch.Tensor:
    """[N, P, H] prompts; a prefix [L, 2, P, D] enters as its flat view [L*2*P, D]: the -avg metrics then
    pool every layer's keys and values (the default: one number per pair, as for prompts), the -tok metrics
    compare layer l's token i with layer l's token i."""
    prompts = [flat(e.prompt) if is_prefix(e.prompt) else e.prompt for e in entries]
    lengths = {e.name: p.shape[0] for e, p in zip(entries, prompts)}
    if len(set(lengths.values())) > 1:
        if metric.endswith("-tok"):
            raise ComposerError(f"{metric} compares token i with token i and needs prompts of one length: "
                                + ", ".join(f"{k}={v}" for k, v in lengths.items()) + "; use cos-avg")
        # E_avg only needs the mean over P: compare means, as [N, 1, H]
        return torch.stack([p.mean(0, keepdim=True) for p in prompts])
    return torch.stack(prompts)


def _dev(spec, backbone: Backbone, data_dir, max_examples: int | None, split: str = "dev") -> Encoded:
    available = spec.split_names()
    split = split if split in available else ("dev" if "dev" in available else "test")
    ds = load_splits(spec, data_dir=data_dir, splits=[split], k_shot=0)[split]
    return encode_split(spec, ds, backbone.tokenizer).subset(max_examples, 0)


def transfer_matrix(library: Library, prompts: list[str], tasks: list[str], model: str | None = None,
                    data_dir=None, max_examples: int | None = 500, split: str = "dev",
                    backbone: Backbone | None = None, device: str = "cpu") -> dict:
    """Zero-shot transfer: each prompt evaluated on each task's dev split -> {"scores": [[...]], ...}."""
    entries = _load(library, prompts)
    names = {e.meta.get("backbone") for e in entries}
    if backbone is None:
        if model is None and len(names) != 1:
            raise ComposerError(f"prompts come from several backbones ({sorted(map(str, names))}); pass --model")
        backbone = load_backbone(model or names.pop(), device=device)
    specs = [load_task(t) for t in tasks]
    scores, metrics = [], []
    for spec in specs:
        enc = _dev(spec, backbone, data_dir, max_examples, split)
        col = []
        for e in entries:
            pm = from_library(e, backbone, spec)
            col.append(evaluate(pm, spec, enc)["score"])
        scores.append(col)
        metrics.append(spec.metric)
    matrix = [list(r) for r in zip(*scores)]  # [prompts, tasks]
    return {"prompts": prompts, "tasks": [s.name for s in specs], "metrics": metrics, "scores": matrix,
            "backbone": backbone.name, "max_examples": max_examples}


def link_graph(G, library: Library, metric: str = "cos-avg", top_k: int = 3, targets: list[str] | None = None,
               data_dir=None, max_examples: int | None = 300, backbone: Backbone | None = None,
               device: str = "cpu") -> dict:
    """For each target: score every other node that has a library prompt, keep the top-k as similar edges.

    Prompt metrics need the target's own prompt (e.g. a short few-shot run); ``transfer`` does not: it
    scores each candidate prompt zero-shot on the target's dev split (SPoT's alternative to similarity).
    """
    if metric not in LINK_METRICS:
        raise ComposerError(f"unknown metric {metric!r}: use one of {', '.join(LINK_METRICS)}")
    if top_k < 1:
        raise ComposerError(f"--top-k must be a whole number >= 1, got {top_k}")
    have = {n: d.get("prompt") for n, d in G.nodes(data=True) if d.get("prompt") and library.exists(d["prompt"])}
    targets = targets or [n for n, d in G.nodes(data=True) if d.get("role") == "target"]
    linked, skipped = {}, {}
    for t in targets:
        cands = [n for n in have if n != t and G.nodes[n].get("role") in ("source", "subtask")]
        if not cands:
            skipped[t] = "no source or subtask prompt in the library"
            continue
        if metric == "transfer":
            spec = load_task(G.nodes[t].get("task") or t)
            if backbone is None:
                backbone = load_backbone(library.meta(have[cands[0]]).get("backbone"), device=device)
            r = transfer_matrix(library, [have[c] for c in cands], [spec.name], data_dir=data_dir,
                                max_examples=max_examples, backbone=backbone)
            scores = {c: row[0] for c, row in zip(cands, r["scores"])}
        else:
            if t not in have:
                skipped[t] = f"its prompt {G.nodes[t].get('prompt')!r} is not in the library (train it, or use --metric transfer)"
                continue
            sim = similarity_matrix(library, [have[t]], metric, backbone=backbone, others=[have[c] for c in cands],
                                    device=device)[0]
            scores = {c: float(s) for c, s in zip(cands, sim)}
        G_.link(G, t, scores, metric, top_k)
        linked[t] = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    return {"metric": metric, "top_k": top_k, "scores": linked, "skipped": skipped}
