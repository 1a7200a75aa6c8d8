"""The composer: a target task's prompt from its subtasks (part_of) and top-k sources (similar).

    candidates(G, target)  -> the library prompts of the target's subtasks and top-k sources
    compose(cfg)           -> a strategy turns them into a prompt; it goes into the library with its
                              provenance, and the weights go back onto the graph's edges

Strategies (math in composer/mixing.py and composer/attention.py):
  best       score each candidate zero-shot on the target's few-shot examples, keep the best
  average    similarity-weighted average (SPoT), softmax with a temperature
  linear     weights optimized on the few-shot examples (LoraHub-style; L-BFGS-B or Powell), L1 penalty
  attention  ATTEMPT: per-example mixtures through a small attention module + a trainable target prompt
  concat     the subtask prompts joined along P in decomposition order
  arithmetic task arithmetic: base + scale * sum_k w_k (candidate_k - its init); negative part_of priors subtract
  ties       TIES-merging of those task vectors: trim to the top --density, elect signs, disjoint mean (--dare:
             DARE's drop and rescale first); inits, base and defaults in composer/task_vectors.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from composer import graph as G_
from composer import mixing
from composer.attention import AttentionComposer, MixtureSource, distill_over, mean_attention
from composer.backbones import Backbone, load_backbone
from composer.config import MERGING_STRATEGIES, STRATEGIES, ComposeConfig
from composer.encoding import Encoded, encode_split
from composer.errors import ComposeError
from composer.evaluate import predict, score
from composer.library import Library, prompt_position
from composer.model import attention_kernels, build_model, freeze_backbone
from composer.prefix import flat, is_prefix, unflat
from composer.runstate import BatchPlan, progress_bar
from composer.taskdata import load_splits
from composer.task_vectors import merge_candidates
from composer.tasks import load_task


__all__ = ["STRATEGIES", "ComposeConfig", "Candidate", "candidates", "compose", "write_weights"]


@dataclass
class Candidate:
    node: str  # graph node (task)
    prompt_name: str  # library entry
    relation: str  # part_of | similar
    weight: float | None  # prior (part_of) or similarity (similar)
    prompt: torch.Tensor  # [P, H]
    meta: dict


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def candidates(G, target: str, library: Library, metric: str | None = None, top_k: int = 3,
               strategy: str = "average", backbone: str | None = None) -> list[Candidate]:
    """The target's subtasks and top-k sources, with their library prompts.

    Raises one ComposeError that lists every node without a usable prompt.
    """
    if target not in G:
        raise ComposeError(f"target {target!r} is not in graph {G.graph.get('name')!r} "
                           f"(nodes: {', '.join(map(str, G))})")
    if strategy == "concat":
        found = [(n, "part_of", w) for n, w in G_.subtasks(G, target)]
        if not found:
            raise ComposeError(f"concat needs subtasks, and {target!r} has no part_of edges in graph "
                               f"{G.graph.get('name')!r}; use another --strategy or add a decomposition")
    else:
        found = G_.neighbours(G, target, metric=metric, top_k=top_k)
    if not found:
        raise ComposeError(f"target {target!r} has no candidates: no part_of edges and no similar edges"
                           f"{f' under {metric}' if metric else ''}; run `prompt-composer graph link` first")
    missing, out = [], []
    for node, rel, w in found:
        pname = G.nodes[node].get("prompt")
        if not pname or not library.exists(pname):
            missing.append(f"{node} (prompt {pname!r})" if pname else f"{node} (no prompt set)")
            continue
        e = library.load(pname)
        out.append(Candidate(node, pname, rel, None if w is None else float(w), e.prompt, e.meta))
    if missing:
        raise ComposeError(f"candidates of {target!r} missing from the library {library.root}: "
                           f"{'; '.join(missing)}; train them first")
    names = [c.prompt_name for c in out]
    kinds = {c.prompt_name: c.meta.get("kind", "prompt") for c in out}
    if len(set(kinds.values())) > 1:
        raise ComposeError(f"candidates of {target!r} differ in kind: "
                           + ", ".join(f"{k}={v}" for k, v in kinds.items())
                           + "; compose one kind (a prompt becomes a prefix with `train TASK --kind prefix "
                             "--init library:NAME`, which starts from the keys and values it induces)")
    positions = {c.prompt_name: prompt_position(c.meta) for c in out}
    if len(set(positions.values())) > 1:
        raise ComposeError(f"candidates of {target!r} differ in prompt position: "
                           + ", ".join(f"{k}={v}" for k, v in positions.items())
                           + "; compose prompts trained with one --prompt-position")
    for attr in ("hidden_size", "backbone"):
        vals = {c.prompt_name: c.meta.get(attr) for c in out}
        if len(set(vals.values())) > 1:
            raise ComposeError(f"candidates of {target!r} differ in {attr.replace('_', ' ')}: "
                               + ", ".join(f"{k}={v}" for k, v in vals.items()))
    if backbone and out[0].meta.get("backbone") not in (None, backbone):
        raise ComposeError(f"candidates {names} are for backbone {out[0].meta.get('backbone')!r}, "
                           f"not {backbone!r}")
    if strategy != "concat":
        lengths = {c.prompt_name: c.meta.get("length", c.prompt.shape[0]) for c in out}
        if len(set(lengths.values())) > 1:
            raise ComposeError(f"candidates of {target!r} differ in prompt length: "
                               + ", ".join(f"{k}={v}" for k, v in lengths.items())
                               + "; use --strategy concat or retrain them with one --prompt-length")
    return out


def _few_shot(spec, backbone: Backbone, shots: int, seed: int, data_dir) -> Encoded:
    """``shots`` training rows per class (a generation task: ``shots`` rows), seeded."""
    splits = load_splits(spec, data_dir=data_dir, splits=["train"], k_shot=0, seed=seed)
    ds = splits["train"]
    if spec.is_generation:
        if shots > len(ds):
            raise ComposeError(f"--shots {shots} is larger than {spec.name}'s training set ({len(ds)} rows); "
                               "lower --shots")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:shots].tolist()
        return encode_split(spec, ds.select(sorted(idx)), backbone.tokenizer)
    labels = ds["label"]
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(spec.num_labels):
        members = [i for i, y in enumerate(labels) if y == c]
        if shots > len(members):
            raise ComposeError(f"--shots {shots} is larger than class {spec.labels[c]!r} of {spec.name}'s "
                               f"training set ({len(members)} examples); lower --shots")
        perm = torch.randperm(len(members), generator=g)[:shots].tolist()
        idx += [members[i] for i in perm]
    return encode_split(spec, ds.select(sorted(idx)), backbone.tokenizer)


def compose(cfg: ComposeConfig, library: Library | None = None, backbone: Backbone | None = None) -> dict:
    """Compose the target's prompt; save it (cfg.save) and write the weights onto the graph (cfg.out_graph)."""
    library = library or Library()
    G = G_.check(G_.load_graph(cfg.graph))  # a cycle in part_of or a conflicting declaration: refused
    cands = candidates(G, cfg.target, library, cfg.metric, cfg.top_k, cfg.strategy,
                       backbone=cfg.backbone or G.graph.get("backbone"))
    names = [c.node for c in cands]
    # prefixes [L, 2, P, D] are mixed as their flat views [L*2*P, D] (a stack of per-layer prompts)
    num_layers = cands[0].prompt.shape[0] if is_prefix(cands[0].prompt) else None
    position = prompt_position(cands[0].meta)  # the candidates agree (candidates())

    def to_model(p: torch.Tensor) -> torch.Tensor:
        """A mixed [P, H] (or flat prefix) -> what the model takes: the prompt, or the [L, 2, P, D] prefix."""
        return unflat(p, num_layers) if num_layers else p

    stack = None if cfg.strategy == "concat" else torch.stack([flat(c.prompt) for c in cands])  # [K, P, H]
    spec = load_task(G.nodes[cfg.target].get("task") or cfg.target)
    needs_model = cfg.strategy in ("best", "linear", "attention")
    bb = backbone
    if needs_model and bb is None:
        bb = load_backbone(cfg.backbone or cands[0].meta.get("backbone") or G.graph.get("backbone"), device=cfg.device)
    device = next(bb.model.parameters()).device if needs_model else torch.device("cpu")
    if stack is not None:
        stack = stack.to(device)
    result: dict = {"target": cfg.target, "strategy": cfg.strategy, "candidates": names,
                    "prompts": [c.prompt_name for c in cands], "relations": [c.relation for c in cands],
                    "metric": cfg.metric, "seed": cfg.seed}
    extras, provenance = {}, {}
    torch.manual_seed(cfg.seed)

    if cfg.strategy == "concat":
        if num_layers:  # along P within every layer's keys and values
            prompt = torch.cat([c.prompt for c in cands], dim=2)
        else:
            prompt = mixing.concat([c.prompt for c in cands])
        weights = [1.0] * len(cands)
    elif cfg.strategy == "average":
        w = [c.weight if c.weight is not None else 1.0 for c in cands]
        if cfg.mix_temperature is None:
            prompt, wt = mixing.average(stack, torch.tensor(w), normalise="sum")
        else:
            prompt, wt = mixing.average(stack, torch.tensor(w), temperature=cfg.mix_temperature)
        prompt = to_model(prompt)
        weights = wt.tolist()
    elif cfg.strategy in MERGING_STRATEGIES:  # on the candidates' own shape: a prefix trims per layer
        def get_backbone():  # only random, vocab and text inits (and induced prefixes) need it
            nonlocal bb
            if bb is None:
                bb = load_backbone(cfg.backbone or cands[0].meta.get("backbone") or G.graph.get("backbone"),
                                   device=cfg.device)
            return bb

        prompt, weights, merged = merge_candidates(cfg, cands, library, get_backbone)
        result.update(merged)
        provenance.update(merged)
    else:
        shots = _few_shot(spec, bb, cfg.shots, cfg.seed, cfg.data_dir)
        pm = build_model(bb, spec, to_model(stack[0]).clone(), seed=cfg.seed, position=position)  # where the backbone is
        freeze_backbone(pm)
        pm.eval()  # deterministic scores while choosing
        result["shots"] = len(shots)
        if cfg.strategy == "best":
            def score_fn(p):  # classification: the task's metric on the shots; generation: minus their target NLL
                p = to_model(p)
                if cfg.steps <= 0:
                    return _shot_score(pm, spec, shots, p)
                tuned = build_model(bb, spec, p.clone(), seed=cfg.seed, position=position)
                freeze_backbone(tuned)
                _fit(tuned, shots, cfg.steps, cfg.lr, cfg.seed, what="tune a candidate")
                return _shot_score(tuned, spec, shots)

            i, scores = mixing.pick_best(stack, score_fn)
            prompt = to_model(stack[i]).clone()
            weights = [1.0 if j == i else 0.0 for j in range(len(cands))]
            result["scores"] = [float(s) for s in scores]
        elif cfg.strategy == "linear":
            pad = bb.tokenizer.pad_token_id
            b = _to(shots.batch(range(len(shots)), pad), device)

            def loss_fn(p):  # cross-entropy of the labels, or the targets' NLL
                return _batch_loss(pm, b, prompt=to_model(p))

            with progress_bar(f"compose {cfg.target}: linear ({cfg.method})", unit="eval") as bar:
                def tick(n, best):
                    bar.update(1)
                    bar.set_postfix(objective=f"{best:.4g}", refresh=False)

                res = mixing.optimize_linear(stack, loss_fn, method=cfg.method, l1=cfg.l1, seed=cfg.seed,
                                             bounds=(cfg.min_weight, cfg.max_weight),
                                             on_eval=tick)
            prompt = to_model(mixing.combine(torch.as_tensor(res.weights, dtype=torch.float32), stack).detach())
            weights = [float(x) for x in res.weights]
            result["optimizer"] = {k: v for k, v in res.to_dict().items() if k != "history"}
        else:  # attention
            comp = AttentionComposer(stack, temperature=cfg.mix_temperature, seed=cfg.seed, input_size=bb.hidden_size)
            pm = build_model(bb, spec, MixtureSource(comp, num_layers=num_layers), seed=cfg.seed, position=position)
            freeze_backbone(pm)
            if cfg.steps > 0:
                _fit(pm, shots, cfg.steps, cfg.lr, cfg.seed)
            att = mean_attention(pm, shots)  # [N, K+1]
            weights = att.mean(0)[:-1].tolist()
            result["target_weight"] = float(att.mean(0)[-1])
            if not spec.is_generation:
                result["per_class"] = {spec.labels[c]: att[shots.labels == c].mean(0).tolist()
                                       for c in range(spec.num_labels)}
            prompt = distill_over(pm, shots)
            if not cfg.distill:
                tensors, conf = pm.prompt_source.state_for_save()  # the source's: it knows a prefix's layers
                extras["composer"] = tensors
                provenance["composer_config"] = conf
            provenance["distilled"] = bool(cfg.distill)
    result["weights"] = weights
    prompt = prompt.detach().cpu()
    if cfg.save:
        provenance.update(strategy=cfg.strategy, graph=str(cfg.graph), candidates=names,
                          prompts=[c.prompt_name for c in cands], weights=weights, metric=cfg.metric,
                          shots=cfg.shots if needs_model else None, seed=cfg.seed, top_k=cfg.top_k)
        meta = {"task": spec.name, "backbone": cands[0].meta.get("backbone"), "family": cands[0].meta.get("family"),
                "hidden_size": cands[0].meta.get("hidden_size"), "kind": "prefix" if num_layers else "prompt", "position": position,
                "prefix_heads": cands[0].meta.get("prefix_heads"),
                "head": cands[0].meta.get("head"), "metrics": {}, "config": vars(cfg).copy(),
                "provenance": provenance}
        library.save(cfg.save, prompt, meta, extras=extras)
        result["saved"] = cfg.save
    write_weights(G, cfg.target, cands, weights, cfg.strategy)
    if cfg.out_graph:
        G_.save_graph(G, cfg.out_graph)
        result["graph"] = str(cfg.out_graph)
    result["shape"] = list(prompt.shape)
    return result


def write_weights(G, target: str, cands: list[Candidate], weights: list[float], strategy: str) -> None:
    """Put each candidate's composed weight on its edge as ``composed:<strategy>``."""
    for c, w in zip(cands, weights):
        for u, _, d in G.in_edges(target, data=True):
            if u == c.node and d.get("relation") == c.relation:
                d[f"composed:{strategy}"] = float(w)


def _batch_loss(pm, b: dict, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """The mean loss of a batch: cross-entropy of its labels, or (a generation task) its targets' NLL."""
    if "targets" in b:
        return pm(b["input_ids"], b["attention_mask"], prompt=prompt, targets=b["targets"]).mean()
    return F.cross_entropy(pm(b["input_ids"], b["attention_mask"], prompt=prompt).float(), b["labels"])


@torch.no_grad()
def _shot_score(pm, spec, shots: Encoded, prompt: torch.Tensor | None = None, batch_size: int = 32) -> float:
    """How well a prompt does on the shots, higher better: the task's metric (classification), or minus the
    mean target NLL (generation: smooth, and no decoding)."""
    if not spec.is_generation:
        return score(spec, predict(pm, shots, prompt=prompt), shots)["score"]
    pad, total = pm.backbone.tokenizer.pad_token_id, 0.0
    for s in range(0, len(shots), batch_size):
        b = _to(shots.batch(range(s, min(s + batch_size, len(shots))), pad), pm.device)
        total += float(pm(b["input_ids"], b["attention_mask"], prompt=prompt, targets=b["targets"]).sum())
    return -total / len(shots)


def _fit(pm, enc: Encoded, steps: int, lr: float, seed: int, batch_size: int = 16,
         what: str = "fit the attention module") -> None:
    """A few AdamW steps on what trains in ``pm`` (its prompt source: attention module + target prompt, or a
    soft prompt)."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    plan = BatchPlan(len(enc), min(batch_size, len(enc)), seed)
    pad = pm.backbone.tokenizer.pad_token_id
    pm.train()
    with progress_bar(f"compose: {what}", steps) as bar:
        for s in range(steps):
            torch.manual_seed(seed * 1_000_003 + s)
            b = _to(enc.batch(plan.indices(s), pad), pm.device)
            loss = _batch_loss(pm, b)
            with attention_kernels(pm.device):
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
    pm.eval()
