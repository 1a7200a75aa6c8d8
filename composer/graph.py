"""Task graphs: a networkx MultiDiGraph of tasks; what one can ask of one, link into one, check in one.

The file format (node and edge attributes, the YAML definition, node-link JSON) and reading and writing
live in composer.graph_io; its public names are re-exported here, so ``composer.graph`` is the one
namespace to use. :func:`validate` lists every semantic fault, one line each; :func:`check` raises
them. Nothing here needs torch or a model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import networkx as nx

from composer.errors import GraphError
from composer.graph_io import (  # noqa: F401  (re-exported: composer.graph is the public namespace)
    EDGE_METRICS,
    PART_OF,
    ROLES,
    SIMILAR,
    decomposition_of,
    from_dict,
    load_graph,
    resolve_graph,
    save_graph,
    similar_key,
    to_dict,
)

__all__ = [
    "EDGE_METRICS",
    "ROLES",
    "check",
    "from_dict",
    "link",
    "load_graph",
    "neighbours",
    "resolve_graph",
    "save_graph",
    "sources",
    "subtasks",
    "to_dict",
    "validate",
]

_MAX_CYCLES = 20


class PromptLibrary(Protocol):
    def exists(self, name: str) -> bool: ...

    def meta(self, name: str) -> dict: ...


# --- queries -------------------------------------------------------------------------


def _need(G: nx.MultiDiGraph, node: str) -> None:
    if node not in G:
        raise GraphError(
            f"unknown node {node!r} in graph {G.graph.get('name')!r}: nodes are {', '.join(map(str, G))}"
        )


def subtasks(G: nx.MultiDiGraph, target: str) -> list[tuple[str, float | None]]:
    """The subtasks of ``target`` along part_of, in decomposition order: [(name, prior weight or None)]."""
    _need(G, target)
    return decomposition_of(G, target)


def sources(G: nx.MultiDiGraph, target: str, metric: str | None = None) -> list[tuple[str, float]]:
    """The similar sources of ``target``, most similar first: [(name, weight)].

    ``metric`` keeps only edges of that metric. Without it, every similar edge counts,
    and a source linked under several metrics is an error (their scales differ).
    """
    _need(G, target)
    found = [
        (u, d.get("weight"), d.get("metric"))
        for u, _, d in G.in_edges(target, data=True)
        if d.get("relation") == SIMILAR and (metric is None or d.get("metric") == metric)
    ]
    if metric is None:
        names = [u for u, _, _ in found]
        dup = sorted({u for u in names if names.count(u) > 1})
        if dup:
            metrics = sorted({str(m) for u, _, m in found if u in dup})
            raise GraphError(
                f"{target!r} has similar edges from {dup[0]!r} under several metrics ({', '.join(metrics)}); "
                "pass a metric"
            )
    return [(u, w) for u, w, _ in sorted(found, key=lambda t: -_number(t[1], -math.inf))]


def neighbours(
    G: nx.MultiDiGraph, target: str, metric: str | None = None, top_k: int | None = None
) -> list[tuple[str, str, float | None]]:
    """The candidates to compose ``target`` from: [(name, relation, weight)].

    Its subtasks (part_of, decomposition order), then its top-k similar sources under
    ``metric`` (most similar first) that are not subtasks already.
    """
    out = [(s, PART_OF, w) for s, w in subtasks(G, target)]
    seen = {s for s, _, _ in out}
    ranked = [(s, SIMILAR, w) for s, w in sources(G, target, metric) if s not in seen]
    return out + (ranked if top_k is None else ranked[: max(0, top_k)])


def _finite(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x)


def _number(x: Any, default: float) -> float:
    return float(x) if _finite(x) else default


def link(
    G: nx.MultiDiGraph, target: str, scores: Mapping[str, float], metric: str, top_k: int
) -> nx.MultiDiGraph:
    """Write similar edges source -> target for the ``top_k`` best ``scores`` under ``metric``.

    Replaces the target's earlier edges of that metric; ``target`` itself is skipped.
    Every name in ``scores`` must be a node. Returns G (changed in place).
    """
    _need(G, target)
    if metric not in EDGE_METRICS:
        raise GraphError(f"unknown similarity metric {metric!r}: use one of {', '.join(EDGE_METRICS)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise GraphError(f"--top-k must be a whole number >= 1, got {top_k!r}")
    unknown = [n for n in scores if n not in G]
    if unknown:
        raise GraphError(
            f"cannot link {unknown[0]!r} to {target!r}: not a node of graph {G.graph.get('name')!r}"
        )
    bad = [(n, s) for n, s in scores.items() if not _finite(s)]
    if bad:
        raise GraphError(f"score of {bad[0][0]!r} for {target!r} is not a finite number: {bad[0][1]!r}")
    key = similar_key(metric)
    for u in [u for u, _, k in G.in_edges(target, keys=True) if k == key]:
        G.remove_edge(u, target, key)
    ranked = sorted(((n, float(s)) for n, s in scores.items() if n != target), key=lambda t: -t[1])
    for name, score in ranked[:top_k]:
        G.add_edge(name, target, key=key, relation=SIMILAR, weight=score, metric=metric)
    return G


# --- validation ----------------------------------------------------------------------


def _cycles(G: nx.MultiDiGraph) -> list[list[str]]:
    part = nx.DiGraph((u, v) for u, v, d in G.edges(data=True) if d.get("relation") == PART_OF)
    found = []
    for cycle in nx.simple_cycles(part):
        found.append(cycle)
        if len(found) >= _MAX_CYCLES:
            break
    # start each cycle at its smallest name, so the message is stable
    out = []
    for c in found:
        i = c.index(min(c))
        out.append(c[i:] + c[:i])
    return sorted(out)


def _weight_text(w: Any) -> str:
    return "missing" if w is None else repr(w)


def validate(
    G: nx.MultiDiGraph,
    library: PromptLibrary | None = None,
    task_exists: Callable[[str], bool] | None = None,
    untrained_ok: Collection[str] = (),
) -> list[str]:
    """Every fault of G, one line each ([] when it is sound).

    Checks: nodes referenced but never declared, roles, nodes declared twice with two
    roles, unknown task specs (``task_exists(name) -> bool``), cycles in part_of,
    weights that are not finite numbers, similar edges with an unknown metric, and with
    a ``library`` (``.exists(name)``, ``.meta(name)``): prompts missing from it, and
    prompts of different hidden size or backbone on one graph. A node whose role is in
    ``untrained_ok`` (e.g. ``("target",)``: its prompt is what gets composed) may name a
    prompt the library does not have yet; one it has is still checked.
    """
    faults: list[str] = []
    for n, d in G.nodes(data=True):
        role = d.get("role")
        if role is None:
            refs = [
                f"{u} -> {v} ({d2.get('relation')})"
                for u, v, d2 in list(G.in_edges(n, data=True)) + list(G.out_edges(n, data=True))
            ]
            faults.append(
                f"unknown node {n!r}: referenced by {', '.join(refs) or 'the graph'} "
                "but not declared under nodes"
            )
        elif role not in ROLES:
            faults.append(f"node {n!r}: role {role!r} is not one of {', '.join(ROLES)}")
    for n, roles in (G.graph.get("declared_twice") or {}).items():
        faults.append(f"node {n!r} is declared twice with two roles: {' and '.join(map(str, roles))}")
    for n, said in (G.graph.get("declared_differently") or {}).items():
        faults.append(f"node {n!r} is declared twice, as {' and as '.join(said)}; keep one declaration")
    if task_exists is not None:
        for n, d in G.nodes(data=True):
            if d.get("role") is None:
                continue  # already reported as unknown
            task = d.get("task") or n
            if not task_exists(task):
                faults.append(
                    f"node {n!r}: unknown task spec {task!r} (not in ./tasks or the packaged catalogue)"
                )
    for cycle in _cycles(G):
        faults.append(f"cycle in part_of: {' -> '.join(cycle + [cycle[0]])}")
    for u, v, d in G.edges(data=True):
        relation = d.get("relation")
        w = d.get("weight")
        if relation == SIMILAR:
            what = f"similar edge {u} -> {v}" + (f" ({d['metric']})" if d.get("metric") else "")
            if not _finite(w):
                faults.append(f"{what}: weight {_weight_text(w)} is not a finite number")
            if d.get("metric") is not None and d["metric"] not in EDGE_METRICS:
                faults.append(
                    f"{what}: unknown metric {d['metric']!r} (use one of {', '.join(EDGE_METRICS)})"
                )
        elif relation == PART_OF:
            if w is not None and not _finite(w):
                faults.append(f"part_of edge {u} -> {v}: prior weight {w!r} is not a finite number")
        else:
            faults.append(f"edge {u} -> {v}: unknown relation {relation!r} (part_of or similar)")
    if library is not None:
        untrained = [
            n
            for n, d in G.nodes(data=True)
            if d.get("role") in untrained_ok and d.get("prompt") and not library.exists(d["prompt"])
        ]
        faults += _prompt_faults(G.subgraph(set(G) - set(untrained)) if untrained else G, library)
    return faults


def _prompt_faults(G: nx.MultiDiGraph, library: PromptLibrary) -> list[str]:
    faults = []
    metas: dict[str, dict] = {}
    for n, d in G.nodes(data=True):
        prompt = d.get("prompt")
        if not prompt:
            continue
        if not library.exists(prompt):
            faults.append(f"node {n!r}: prompt {prompt!r} is not in the library (train it, or fix the name)")
        else:
            metas[prompt] = library.meta(prompt) or {}
    for key, what in (("hidden_size", "hidden sizes"), ("backbone", "backbones")):
        groups: dict[str, list[str]] = {}
        for prompt, meta in metas.items():
            groups.setdefault(str(meta.get(key)), []).append(prompt)
        if len(groups) > 1:
            parts = "; ".join(
                f"{value}: {', '.join(sorted(names))}" for value, names in sorted(groups.items())
            )
            faults.append(f"prompts of different {what} on one graph: {parts}")
    return faults


def check(
    G: nx.MultiDiGraph,
    library: PromptLibrary | None = None,
    task_exists: Callable[[str], bool] | None = None,
) -> nx.MultiDiGraph:
    """Return G if :func:`validate` finds nothing, else raise GraphError(summary, faults)."""
    faults = validate(G, library=library, task_exists=task_exists)
    if faults:
        more = f" (+{len(faults) - 1} more)" if len(faults) > 1 else ""
        raise GraphError(f"graph {G.graph.get('name')!r}: {faults[0]}{more}", faults)
    return G
