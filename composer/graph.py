"""Task graphs: a networkx MultiDiGraph of tasks, read from YAML, written as node-link JSON.

Nodes are task names with attributes ``role`` (source | subtask | target), ``task``
(the task spec name, default the node name) and ``prompt`` (a library prompt name or
None). Edges point from the task that gives to the task that receives:

- ``part_of``: subtask -> task it is part of; key ``"part_of"``, attributes
  ``relation="part_of"``, ``order`` (position in the decomposition; the concat composer
  joins subtask prompts in this order) and optionally ``weight`` (a prior).
- ``similar``: source -> task; key ``f"similar:{metric}"`` (``"similar"`` for a fixed
  edge without a metric), attributes ``relation="similar"``, ``weight`` (the
  similarity; higher = more similar) and ``metric``.

Graph attributes: ``name``, ``backbone`` (or None), and ``declared_twice`` (faults in
the YAML that a graph cannot hold: one node declared with two roles).

A graph definition (graphs/NAME.yaml)::

    name: demo
    backbone: minilm
    nodes:
      - {name: polarity, role: subtask, prompt: polarity-minilm}
      - {name: negated-polarity, role: target, task: negated-polarity}
    decomposition:
      negated-polarity: [polarity, negation]            # or [{task: polarity, weight: 0.5}, ...]
    similar:
      - {source: polarity, target: negated-polarity, weight: 0.8, metric: cos-avg}

Loading checks the shape (one-line GraphError); :func:`validate` lists every semantic
fault, one line each; :func:`check` raises them. Nothing here needs torch or a model.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import networkx as nx
import yaml

import composer
from composer.atomic import atomic_write_text
from composer.errors import GraphError

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

ROLES = ("source", "subtask", "target")
PART_OF = "part_of"
SIMILAR = "similar"
# Metrics a similar edge may carry: the similarity metrics, the zero-shot transfer score,
# and "prior" for a weight written by hand.
EDGE_METRICS = ("cos-avg", "euclid-avg", "cos-tok", "euclid-tok", "on", "transfer", "prior")
_MAX_CYCLES = 20


class PromptLibrary(Protocol):
    def exists(self, name: str) -> bool: ...

    def meta(self, name: str) -> dict: ...


# --- reading -------------------------------------------------------------------------


def _repo_graphs() -> Path:
    return Path(composer.__file__).resolve().parent.parent / "graphs"


def resolve_graph(path_or_name: str | os.PathLike) -> Path:
    """A graph file: an existing path, else NAME in ./graphs, the source tree's graphs/, the catalogue."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml", ".json") or len(p.parts) > 1:
        raise GraphError(f"graph file not found: {str(path_or_name)!r}")
    name = str(path_or_name)
    for folder in (Path.cwd() / "graphs", _repo_graphs()):
        for suffix in (".yaml", ".yml", ".json"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    try:
        packaged = importlib.resources.files("composer.catalog.graphs") / f"{name}.yaml"
        if packaged.is_file():
            with importlib.resources.as_file(packaged) as f:
                return Path(f)
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    raise GraphError(f"unknown graph {name!r}: not a file, not in ./graphs or the packaged catalogue")


def load_graph(path_or_name: str | os.PathLike) -> nx.MultiDiGraph:
    """Read a graph: a YAML definition or node-link JSON (by suffix), or a catalogue name."""
    path = resolve_graph(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraphError(f"cannot read graph {str(path)!r}: {e}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GraphError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        return _from_node_link(data, str(path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GraphError(f"{path}: not YAML{where} ({getattr(e, 'problem', None) or e})") from None
    return from_dict(data, where=str(path))


def _fail(where: str, msg: str) -> GraphError:
    return GraphError(f"{where}: {msg}")


def _decomposition_entries(where: str, target: str, spec: Any) -> list[tuple[str, Any]]:
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list):
        raise _fail(
            where, f"decomposition of {target!r} must be a list of subtasks, got {type(spec).__name__}"
        )
    out = []
    for item in spec:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, Mapping) and isinstance(item.get("task"), str):
            unknown = set(item) - {"task", "weight"}
            if unknown:
                raise _fail(
                    where, f"decomposition of {target!r}: unknown keys {sorted(unknown)} (use task, weight)"
                )
            out.append((item["task"], item.get("weight")))
        else:
            raise _fail(
                where,
                f"decomposition of {target!r}: each entry is a name or {{task: NAME, weight: W}}, "
                f"got {item!r}",
            )
    return out


def from_dict(data: Any, where: str = "graph") -> nx.MultiDiGraph:
    """Build a graph from a parsed YAML definition (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise _fail(
            where,
            f"expected a mapping with keys name, nodes, decomposition, similar; got {type(data).__name__}",
        )
    unknown = set(data) - {"name", "description", "backbone", "nodes", "decomposition", "similar"}
    if unknown:
        raise _fail(
            where,
            f"unknown top-level keys {sorted(unknown)} (use name, backbone, nodes, decomposition, similar)",
        )
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise _fail(where, "'nodes' must be a non-empty list of {name, role, task, prompt}")
    decomposition = data.get("decomposition") or {}
    if not isinstance(decomposition, Mapping):
        raise _fail(
            where, f"'decomposition' must map a target to its subtasks, got {type(decomposition).__name__}"
        )
    similar = data.get("similar") or []
    if not isinstance(similar, list):
        raise _fail(
            where,
            f"'similar' must be a list of {{source, target, weight, metric}}, got {type(similar).__name__}",
        )

    G = nx.MultiDiGraph()
    G.graph["name"] = str(data.get("name") or Path(where).stem)
    G.graph["backbone"] = data.get("backbone")
    if data.get("description"):
        G.graph["description"] = str(data["description"])
    twice: dict[str, list[str]] = {}
    for i, node in enumerate(nodes):
        if not isinstance(node, Mapping) or not isinstance(node.get("name"), str) or not node["name"]:
            raise _fail(where, f"nodes[{i}] must be a mapping with a string 'name', got {node!r}")
        bad = set(node) - {"name", "role", "task", "prompt", "description"}
        if bad:
            raise _fail(
                where, f"node {node['name']!r}: unknown keys {sorted(bad)} (use name, role, task, prompt)"
            )
        name, role = node["name"], node.get("role")
        attrs = {"role": role, "task": node.get("task") or name, "prompt": node.get("prompt")}
        if node.get("description"):
            attrs["description"] = node["description"]
        if name in G:
            prev = G.nodes[name]["role"]
            if prev != role:
                twice.setdefault(name, [prev]).append(role)
            continue  # the first declaration stands; validate() reports the conflict
        G.add_node(name, **attrs)
    if twice:
        G.graph["declared_twice"] = twice

    for target, spec in decomposition.items():
        for order, (sub, weight) in enumerate(_decomposition_entries(where, str(target), spec)):
            _ensure(G, sub)
            _ensure(G, str(target))
            attrs = {"relation": PART_OF, "order": order}
            if weight is not None:
                attrs["weight"] = weight
            G.add_edge(sub, str(target), key=PART_OF, **attrs)
    for i, edge in enumerate(similar):
        if not isinstance(edge, Mapping) or not all(
            isinstance(edge.get(k), str) for k in ("source", "target")
        ):
            raise _fail(
                where, f"similar[{i}] must be a mapping with string 'source' and 'target', got {edge!r}"
            )
        if "weight" not in edge:
            raise _fail(where, f"similar[{i}] ({edge['source']} -> {edge['target']}) has no 'weight'")
        metric = edge.get("metric")
        if metric is True:  # YAML 1.1 reads a bare `on` as true
            metric = "on"
        _ensure(G, edge["source"])
        _ensure(G, edge["target"])
        G.add_edge(
            edge["source"],
            edge["target"],
            key=_similar_key(metric),
            relation=SIMILAR,
            weight=edge["weight"],
            metric=metric,
        )
    return G


def _ensure(G: nx.MultiDiGraph, name: str) -> None:
    # An edge may name an undeclared node; it enters with role None and validate() reports it.
    if name not in G:
        G.add_node(name, role=None, task=name, prompt=None)


def _similar_key(metric: str | None) -> str:
    return SIMILAR if metric is None else f"{SIMILAR}:{metric}"


def _from_node_link(data: Any, where: str) -> nx.MultiDiGraph:
    if not isinstance(data, Mapping) or not isinstance(data.get("nodes"), list):
        raise _fail(where, "not a node-link graph: expected an object with 'nodes' and 'edges' lists")
    edges_key = "edges" if "edges" in data else "links" if "links" in data else None
    if edges_key is None or not isinstance(data[edges_key], list):
        raise _fail(where, "not a node-link graph: no 'edges' (or 'links') list")
    for i, node in enumerate(data["nodes"]):
        if not isinstance(node, Mapping) or "id" not in node:
            raise _fail(where, f"nodes[{i}] has no 'id'")
        if "role" not in node:
            raise _fail(where, f"node {node['id']!r} has no 'role' attribute (one of {', '.join(ROLES)})")
    for i, edge in enumerate(data[edges_key]):
        if not isinstance(edge, Mapping) or "source" not in edge or "target" not in edge:
            raise _fail(where, f"{edges_key}[{i}] needs 'source' and 'target'")
        relation = edge.get("relation") or str(edge.get("key", "")).split(":")[0] or None
        if relation not in (PART_OF, SIMILAR):
            raise _fail(
                where, f"edge {edge['source']} -> {edge['target']} has no 'relation' (part_of or similar)"
            )
        if relation == SIMILAR and "weight" not in edge:
            raise _fail(where, f"similar edge {edge['source']} -> {edge['target']} has no 'weight'")
    try:
        G = nx.node_link_graph(data, directed=True, multigraph=True, edges=edges_key)
    except (nx.NetworkXError, KeyError, TypeError) as e:
        raise _fail(where, f"not a node-link graph ({e})") from None
    if not G.is_multigraph() or not G.is_directed():
        G = nx.MultiDiGraph(G)
    for u, v, k, d in list(G.edges(keys=True, data=True)):
        relation = d.get("relation") or str(k).split(":")[0]
        d["relation"] = relation
        if isinstance(k, int):  # a tool that does not write keys: re-key by relation
            G.remove_edge(u, v, k)
            G.add_edge(u, v, key=PART_OF if relation == PART_OF else _similar_key(d.get("metric")), **d)
    for n, d in G.nodes(data=True):
        d.setdefault("role", None)  # a node only named by an edge: validate() reports it
        d.setdefault("task", n)
        d.setdefault("prompt", None)
    G.graph.setdefault("name", Path(where).stem)
    G.graph.setdefault("backbone", None)
    return G


# --- writing -------------------------------------------------------------------------


def save_graph(G: nx.MultiDiGraph, path: str | os.PathLike) -> Path:
    """Write G as node-link JSON (edges under "edges"), atomically; or as YAML for .yaml/.yml."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(to_dict(G), sort_keys=False, allow_unicode=True)
    else:
        # a weight that is NaN/inf is written as NaN/Infinity (Python's JSON reads them back),
        # so an invalid graph keeps its faults for validate() to report
        text = json.dumps(nx.node_link_data(G, edges="edges"), indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def to_dict(G: nx.MultiDiGraph) -> dict:
    """The YAML-shaped definition of G: name, backbone, nodes, decomposition, similar."""
    nodes = []
    for n, d in G.nodes(data=True):
        node = {"name": n, "role": d.get("role")}
        if d.get("task", n) != n:
            node["task"] = d["task"]
        if d.get("prompt") is not None:
            node["prompt"] = d["prompt"]
        if d.get("description"):
            node["description"] = d["description"]
        nodes.append(node)
    decomposition: dict[str, list] = {}
    for target in G.nodes:
        subs = subtasks(G, target)
        if subs:
            decomposition[target] = [s if w is None else {"task": s, "weight": w} for s, w in subs]
    similar = [
        {
            "source": u,
            "target": v,
            "weight": d.get("weight"),
            **({"metric": d["metric"]} if d.get("metric") else {}),
        }
        for u, v, d in G.edges(data=True)
        if d.get("relation") == SIMILAR
    ]
    out: dict[str, Any] = {"name": G.graph.get("name")}
    if G.graph.get("backbone"):
        out["backbone"] = G.graph["backbone"]
    if G.graph.get("description"):
        out["description"] = G.graph["description"]
    out["nodes"] = nodes
    if decomposition:
        out["decomposition"] = decomposition
    if similar:
        out["similar"] = similar
    return out


# --- queries -------------------------------------------------------------------------


def _need(G: nx.MultiDiGraph, node: str) -> None:
    if node not in G:
        raise GraphError(
            f"unknown node {node!r} in graph {G.graph.get('name')!r}: nodes are {', '.join(map(str, G))}"
        )


def subtasks(G: nx.MultiDiGraph, target: str) -> list[tuple[str, float | None]]:
    """The subtasks of ``target`` along part_of, in decomposition order: [(name, prior weight or None)]."""
    _need(G, target)
    found = [
        (d.get("order", math.inf), i, u, d.get("weight"))
        for i, (u, _, d) in enumerate(G.in_edges(target, data=True))
        if d.get("relation") == PART_OF
    ]
    return [(u, w) for _, _, u, w in sorted(found, key=lambda t: (t[0], t[1]))]


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
    key = _similar_key(metric)
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
) -> list[str]:
    """Every fault of G, one line each ([] when it is sound).

    Checks: nodes referenced but never declared, roles, nodes declared twice with two
    roles, unknown task specs (``task_exists(name) -> bool``), cycles in part_of,
    weights that are not finite numbers, similar edges with an unknown metric, and with
    a ``library`` (``.exists(name)``, ``.meta(name)``): prompts missing from it, and
    prompts of different hidden size or backbone on one graph.
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
        faults += _prompt_faults(G, library)
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
