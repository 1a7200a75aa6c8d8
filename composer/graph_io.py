"""The task graph's file format: its vocabulary, reading (YAML definition, node-link JSON), writing.

composer.graph re-exports everything public here (``composer.graph.load_graph`` and so on); this module
holds what a graph file means, composer.graph what one can ask of a graph (queries, linking, validation).

Nodes are task names with attributes ``role`` (source | subtask | target), ``task``
(the task spec name, default the node name) and ``prompt`` (a library prompt name or
None). Edges point from the task that gives to the task that receives:

- ``part_of``: subtask -> task it is part of; key ``"part_of"``, attributes
  ``relation="part_of"``, ``order`` (position in the decomposition; the concat composer
  joins subtask prompts in this order) and optionally ``weight`` (a prior).
- ``similar``: source -> task; key ``f"similar:{metric}"`` (``"similar"`` for a fixed
  edge without a metric), attributes ``relation="similar"``, ``weight`` (the
  similarity; higher = more similar) and ``metric``.

Graph attributes: ``name``, ``backbone`` (or None), ``declared_twice`` and ``declared_differently``
(faults in the YAML that a graph cannot hold: one node declared with two roles, or with one role and two
prompts or tasks).

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

Loading checks the shape (one-line GraphError); composer.graph.validate lists every semantic fault.
Nothing here needs torch or a model.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

import composer
from composer.atomic import atomic_write_text
from composer.config import EDGE_METRICS
from composer.errors import GraphError

__all__ = [
    "EDGE_METRICS",
    "PART_OF",
    "ROLES",
    "SIMILAR",
    "decomposition_of",
    "from_dict",
    "load_graph",
    "resolve_graph",
    "save_graph",
    "similar_key",
    "to_dict",
]

ROLES = ("source", "subtask", "target")
PART_OF = "part_of"
SIMILAR = "similar"
# EDGE_METRICS (composer/config.py): what a similar edge may carry: the similarity metrics, the zero-shot
# transfer score, and "prior" for a weight written by hand.



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
    differ: dict[str, list[str]] = {}
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
            else:
                said = {k: G.nodes[name].get(k) for k in ("task", "prompt")}
                if said != {k: attrs[k] for k in said}:  # same role, another prompt or task: one would be lost
                    differ.setdefault(name, [_said(said)]).append(_said(attrs))
            continue  # the first declaration stands; validate() reports the conflict
        G.add_node(name, **attrs)
    if twice:
        G.graph["declared_twice"] = twice
    if differ:
        G.graph["declared_differently"] = differ

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
            key=similar_key(metric),
            relation=SIMILAR,
            weight=edge["weight"],
            metric=metric,
        )
    return G


def _ensure(G: nx.MultiDiGraph, name: str) -> None:
    # An edge may name an undeclared node; it enters with role None and validate() reports it.
    if name not in G:
        G.add_node(name, role=None, task=name, prompt=None)


def similar_key(metric: str | None) -> str:
    """The edge key of a similar edge: ``similar:METRIC``, or ``similar`` for one without a metric."""
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
            G.add_edge(u, v, key=PART_OF if relation == PART_OF else similar_key(d.get("metric")), **d)
    for n, d in G.nodes(data=True):
        d.setdefault("role", None)  # a node only named by an edge: validate() reports it
        d.setdefault("task", n)
        d.setdefault("prompt", None)
    G.graph.setdefault("name", Path(where).stem)
    G.graph.setdefault("backbone", None)
    return G


# --- writing -------------------------------------------------------------------------


def _said(attrs: dict) -> str:
    """A node declaration as a fault line shows it: task 'x', prompt 'p'."""
    return ", ".join(f"{k} {attrs.get(k)!r}" for k in ("task", "prompt"))


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
        subs = decomposition_of(G, target)
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


def decomposition_of(G: nx.MultiDiGraph, target: str) -> list[tuple[str, float | None]]:
    """The part_of in-edges of ``target`` in decomposition order: [(subtask, prior weight or None)]."""
    found = [
        (d.get("order", math.inf), i, u, d.get("weight"))
        for i, (u, _, d) in enumerate(G.in_edges(target, data=True))
        if d.get("relation") == PART_OF
    ]
    return [(u, w) for _, _, u, w in sorted(found, key=lambda t: (t[0], t[1]))]

