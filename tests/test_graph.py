"""Task graphs: YAML and node-link JSON round trips, queries, link, every validation fault, pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import pytest
import yaml

from composer import graph as cg
from composer.errors import GraphError

ROOT = Path(__file__).resolve().parents[1]


def task_exists(name: str) -> bool:
    return (ROOT / "tasks" / f"{name}.yaml").is_file()


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def same_graph(G: nx.MultiDiGraph, H: nx.MultiDiGraph) -> None:
    assert list(G.nodes(data=True)) == list(H.nodes(data=True))
    assert sorted(G.edges(keys=True, data=True), key=repr) == sorted(H.edges(keys=True, data=True), key=repr)
    assert G.graph == H.graph


DEFINITION = {
    "name": "small",
    "backbone": "minilm",
    "nodes": [
        {"name": "polarity", "role": "subtask", "prompt": "polarity-minilm"},
        {"name": "topic", "role": "subtask", "prompt": "topic-minilm"},
        {"name": "sst2", "role": "source", "prompt": "sst2-minilm"},
        {"name": "mr", "role": "source"},
        {"name": "topic-polarity", "role": "target", "task": "topic-polarity"},
    ],
    "decomposition": {"topic-polarity": ["topic", {"task": "polarity", "weight": 0.5}]},
    "similar": [
        {"source": "sst2", "target": "topic-polarity", "weight": 0.4, "metric": "cos-avg"},
        {"source": "mr", "target": "topic-polarity", "weight": 0.7, "metric": "cos-avg"},
        {"source": "sst2", "target": "topic-polarity", "weight": 0.9, "metric": "on"},
    ],
}


@pytest.fixture
def small(tmp_path):
    return cg.load_graph(write_yaml(tmp_path / "small.yaml", DEFINITION))


# --- shipped graphs ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "glue-superglue"])
def test_shipped_graphs_are_sound(name):
    G = cg.load_graph(ROOT / "graphs" / f"{name}.yaml")
    assert cg.validate(G, task_exists=task_exists) == []
    assert all(d["role"] in cg.ROLES for _, d in G.nodes(data=True))


def test_demo_graph_decomposition():
    G = cg.load_graph("demo")
    assert cg.subtasks(G, "negated-polarity") == [("polarity", None), ("negation", None)]
    assert cg.subtasks(G, "topic-polarity") == [("topic", None), ("polarity", None)]
    assert G.nodes["polarity"]["prompt"] == "polarity-minilm"
    assert G.graph["backbone"] == "minilm"


# --- building, round trips -------------------------------------------------------------


def test_yaml_builds_edges_with_keys_and_attributes(small):
    G = small
    assert isinstance(G, nx.MultiDiGraph)
    assert G.edges["polarity", "topic-polarity", "part_of"] == {
        "relation": "part_of",
        "order": 1,
        "weight": 0.5,
    }
    assert G.edges["topic", "topic-polarity", "part_of"] == {"relation": "part_of", "order": 0}
    assert G.edges["sst2", "topic-polarity", "similar:on"]["weight"] == 0.9
    assert G.edges["sst2", "topic-polarity", "similar:cos-avg"] == {
        "relation": "similar",
        "weight": 0.4,
        "metric": "cos-avg",
    }
    assert G.nodes["topic-polarity"] == {"role": "target", "task": "topic-polarity", "prompt": None}
    assert G.nodes["mr"]["task"] == "mr"


def test_yaml_to_json_to_graph_round_trip(small, tmp_path):
    out = cg.save_graph(small, tmp_path / "out" / "small.json")
    data = json.loads(out.read_text())
    assert "edges" in data and "links" not in data
    assert [p.name for p in out.parent.iterdir()] == ["small.json"]  # no temp file left behind
    back = cg.load_graph(out)
    same_graph(small, back)
    # and back to YAML
    again = cg.from_dict(cg.to_dict(back))
    same_graph(small, again)
    yaml_out = cg.save_graph(back, tmp_path / "small-again.yaml")
    same_graph(small, cg.load_graph(yaml_out))


def test_decomposition_order_survives_json_when_node_order_differs(tmp_path):
    d = {
        "name": "o",
        "nodes": [
            {"name": "b", "role": "subtask"},
            {"name": "a", "role": "subtask"},
            {"name": "t", "role": "target"},
        ],
        "decomposition": {"t": ["a", "b"]},
    }
    G = cg.from_dict(d)
    assert [s for s, _ in cg.subtasks(G, "t")] == ["a", "b"]
    back = cg.load_graph(cg.save_graph(G, tmp_path / "o.json"))
    assert [s for s, _ in cg.subtasks(back, "t")] == ["a", "b"]


def test_load_by_name_from_cwd_graphs(tmp_path, monkeypatch):
    (tmp_path / "graphs").mkdir()
    write_yaml(tmp_path / "graphs" / "mine.yaml", DEFINITION)
    monkeypatch.chdir(tmp_path)
    assert cg.load_graph("mine").graph["name"] == "small"
    assert cg.load_graph("demo").graph["name"] == "demo"  # falls back to the source tree's graphs/
    with pytest.raises(GraphError, match="unknown graph 'nope': not a file, not in ./graphs or the packaged"):
        cg.load_graph("nope")


def test_foreign_node_link_json_is_rekeyed(tmp_path):
    data = {
        "directed": True,
        "multigraph": False,
        "graph": {},
        "nodes": [{"id": "a", "role": "source"}, {"id": "t", "role": "target"}],
        "links": [{"source": "a", "target": "t", "relation": "similar", "weight": 0.3, "metric": "on"}],
    }
    (tmp_path / "f.json").write_text(json.dumps(data))
    G = cg.load_graph(tmp_path / "f.json")
    assert G.edges["a", "t", "similar:on"]["weight"] == 0.3
    assert cg.sources(G, "t") == [("a", 0.3)]


# --- queries -----------------------------------------------------------------------------


def test_subtasks_sources_neighbours(small):
    assert cg.subtasks(small, "topic-polarity") == [("topic", None), ("polarity", 0.5)]
    assert cg.sources(small, "topic-polarity", "cos-avg") == [("mr", 0.7), ("sst2", 0.4)]
    assert cg.sources(small, "topic-polarity", "on") == [("sst2", 0.9)]
    assert cg.sources(small, "topic-polarity", "transfer") == []
    with pytest.raises(GraphError, match="similar edges from 'sst2' under several metrics \\(cos-avg, on\\)"):
        cg.sources(small, "topic-polarity")
    assert cg.neighbours(small, "topic-polarity", "cos-avg", top_k=1) == [
        ("topic", "part_of", None),
        ("polarity", "part_of", 0.5),
        ("mr", "similar", 0.7),
    ]
    with pytest.raises(GraphError, match="unknown node 'nope' in graph 'small'"):
        cg.subtasks(small, "nope")


def test_link_writes_the_top_k_edges(small):
    scores = {"sst2": 0.2, "mr": 0.8, "polarity": 0.5, "topic": 0.1, "topic-polarity": 1.0}
    G = cg.link(small, "topic-polarity", scores, "cos-avg", top_k=2)
    assert G is small
    # the target itself is skipped; the old cos-avg edges are replaced; the `on` edge stays
    assert cg.sources(G, "topic-polarity", "cos-avg") == [("mr", 0.8), ("polarity", 0.5)]
    assert not G.has_edge("sst2", "topic-polarity", "similar:cos-avg")
    assert cg.sources(G, "topic-polarity", "on") == [("sst2", 0.9)]
    assert G.edges["polarity", "topic-polarity", "similar:cos-avg"] == {
        "relation": "similar",
        "weight": 0.5,
        "metric": "cos-avg",
    }
    assert G.has_edge("polarity", "topic-polarity", "part_of")  # a subtask may also be similar
    cg.link(G, "topic-polarity", {"sst2": -3.0, "mr": -1.0}, "euclid-avg", top_k=5)
    assert cg.sources(G, "topic-polarity", "euclid-avg") == [("mr", -1.0), ("sst2", -3.0)]


def test_link_bad_input(small):
    with pytest.raises(GraphError, match="unknown similarity metric 'cosine': use one of cos-avg"):
        cg.link(small, "topic-polarity", {"mr": 0.1}, "cosine", top_k=1)
    with pytest.raises(GraphError, match="--top-k must be a whole number >= 1, got 0"):
        cg.link(small, "topic-polarity", {"mr": 0.1}, "cos-avg", top_k=0)
    with pytest.raises(GraphError, match="cannot link 'ghost' to 'topic-polarity': not a node"):
        cg.link(small, "topic-polarity", {"ghost": 0.1}, "cos-avg", top_k=1)
    with pytest.raises(GraphError, match="score of 'mr' for 'topic-polarity' is not a finite number: nan"):
        cg.link(small, "topic-polarity", {"mr": math.nan}, "cos-avg", top_k=1)


# --- validation ------------------------------------------------------------------------


class FakeLibrary:
    def __init__(self, metas: dict[str, dict]):
        self.metas = metas

    def exists(self, name: str) -> bool:
        return name in self.metas

    def meta(self, name: str) -> dict:
        return self.metas[name]


def faulty_graph(tmp_path) -> nx.MultiDiGraph:
    text = """
name: faulty
nodes:
  - {name: a, role: subtask, prompt: a-minilm}
  - {name: b, role: subtask, prompt: b-minilm}
  - {name: c, role: source, task: no-such-task, prompt: c-smollm}
  - {name: t, role: target, prompt: t-minilm}
  - {name: t, role: source}
  - {name: s, role: source, prompt: missing-prompt}
  - {name: w, role: helper}
decomposition:
  a: [b]
  b: [a]
  t: [a, ghost]
similar:
  - {source: c, target: t, weight: .nan, metric: cos-avg}
  - {source: s, target: t, weight: high, metric: on}
  - {source: a, target: t, weight: .inf}
  - {source: b, target: t, weight: 0.3, metric: cosine}
"""
    (tmp_path / "faulty.yaml").write_text(text)
    return cg.load_graph(tmp_path / "faulty.yaml")


LIBRARY = FakeLibrary(
    {
        "a-minilm": {"hidden_size": 384, "backbone": "minilm"},
        "b-minilm": {"hidden_size": 384, "backbone": "minilm"},
        "c-smollm": {"hidden_size": 576, "backbone": "smollm2-135m"},
        "t-minilm": {"hidden_size": 384, "backbone": "minilm"},
    }
)


def test_validate_reports_every_fault_one_line_each(tmp_path):
    G = faulty_graph(tmp_path)
    faults = cg.validate(G, library=LIBRARY, task_exists=lambda n: n != "no-such-task")
    expected = [
        "unknown node 'ghost': referenced by ghost -> t (part_of) but not declared under nodes",
        "node 'w': role 'helper' is not one of source, subtask, target",
        "node 't' is declared twice with two roles: target and source",
        "node 'c': unknown task spec 'no-such-task' (not in ./tasks or the packaged catalogue)",
        "cycle in part_of: a -> b -> a",
        "similar edge c -> t (cos-avg): weight nan is not a finite number",
        "similar edge s -> t (on): weight 'high' is not a finite number",
        "similar edge a -> t: weight inf is not a finite number",
        (
            "similar edge b -> t (cosine): unknown metric 'cosine' (use one of cos-avg, euclid-avg, cos-tok, "
            "euclid-tok, on, transfer, prior)"
        ),
        "node 's': prompt 'missing-prompt' is not in the library (train it, or fix the name)",
        "prompts of different hidden sizes on one graph: 384: a-minilm, b-minilm, t-minilm; 576: c-smollm",
        (
            "prompts of different backbones on one graph: minilm: a-minilm, b-minilm, t-minilm; "
            "smollm2-135m: c-smollm"
        ),
    ]
    assert sorted(faults) == sorted(expected)
    assert all("\n" not in f for f in faults)
    with pytest.raises(GraphError) as info:
        cg.check(G, library=LIBRARY, task_exists=lambda n: n != "no-such-task")
    assert info.value.faults == faults
    assert str(info.value).startswith("graph 'faulty': ") and f"(+{len(faults) - 1} more)" in str(info.value)


def test_validate_without_library_or_tasks_checks_structure_only(tmp_path):
    faults = cg.validate(faulty_graph(tmp_path))
    assert not any("library" in f or "task spec" in f or "hidden size" in f for f in faults)
    assert "cycle in part_of: a -> b -> a" in faults


def test_longer_cycle_and_self_loop_spelled_out():
    G = cg.from_dict(
        {
            "name": "cyc",
            "nodes": [{"name": n, "role": "subtask"} for n in "xyzq"],
            "decomposition": {"y": ["x"], "z": ["y"], "x": ["z"], "q": ["q"]},
        }
    )
    faults = cg.validate(G)
    assert "cycle in part_of: q -> q" in faults
    assert "cycle in part_of: x -> y -> z -> x" in faults


def test_invalid_graph_survives_json_round_trip_with_its_faults(tmp_path):
    G = faulty_graph(tmp_path)
    back = cg.load_graph(cg.save_graph(G, tmp_path / "faulty.json"))
    assert sorted(cg.validate(back, library=LIBRARY)) == sorted(cg.validate(G, library=LIBRARY))


# --- bad input: one line each --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nnodes: [a, b\n", r"bad\.yaml: not YAML at line \d"),
        ("- a\n- b\n", "expected a mapping with keys name, nodes, decomposition, similar; got list"),
        ("name: x\n", "'nodes' must be a non-empty list"),
        ("name: x\nnodes: [{role: source}]\n", r"nodes\[0\] must be a mapping with a string 'name'"),
        ("name: x\nnodes: [{name: a, role: source, colour: red}]\n", "node 'a': unknown keys \\['colour'\\]"),
        ("name: x\nnodes: [{name: a, role: source}]\nedges: []\n", "unknown top-level keys \\['edges'\\]"),
        (
            "name: x\nnodes: [{name: a, role: source}]\ndecomposition: [a]\n",
            "'decomposition' must map a target",
        ),
        (
            "name: x\nnodes: [{name: a, role: source}]\ndecomposition: {a: [{task: b, w: 1}]}\n",
            "decomposition of 'a': unknown keys \\['w'\\]",
        ),
        (
            "name: x\nnodes: [{name: a, role: source}]\nsimilar: [{source: a, target: b}]\n",
            r"similar\[0\] \(a -> b\) has no 'weight'",
        ),
    ],
)
def test_bad_yaml_is_one_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(GraphError, match=message) as info:
        cg.load_graph(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "not JSON"),
        ({"nodes": [{"id": "a", "role": "source"}]}, "no 'edges' \\(or 'links'\\) list"),
        (
            {"nodes": [{"id": "a"}], "edges": []},
            "node 'a' has no 'role' attribute \\(one of source, subtask, target\\)",
        ),
        ({"nodes": [{"role": "source"}], "edges": []}, "nodes\\[0\\] has no 'id'"),
        (
            {"nodes": [{"id": "a", "role": "source"}], "edges": [{"source": "a", "target": "a"}]},
            "edge a -> a has no 'relation'",
        ),
        (
            {
                "nodes": [{"id": "a", "role": "source"}],
                "edges": [{"source": "a", "target": "a", "relation": "similar"}],
            },
            "similar edge a -> a has no 'weight'",
        ),
    ],
)
def test_bad_node_link_json_is_one_line(tmp_path, data, message):
    (tmp_path / "g.json").write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(GraphError, match=message) as info:
        cg.load_graph(tmp_path / "g.json")
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(GraphError, match="graph file not found"):
        cg.load_graph(tmp_path / "nope.yaml")


# --- pictures ------------------------------------------------------------------------------


def big_graph() -> nx.MultiDiGraph:
    nodes = (
        [{"name": f"source-{i}", "role": "source"} for i in range(10)]
        + [{"name": f"subtask-{i}", "role": "subtask"} for i in range(7)]
        + [{"name": f"target-{i}", "role": "target"} for i in range(8)]
    )
    G = cg.from_dict(
        {
            "name": "big",
            "nodes": nodes,
            "decomposition": {
                f"target-{i}": [f"subtask-{i % 7}", f"subtask-{(i + 3) % 7}"] for i in range(8)
            },
        }
    )
    for i in range(8):
        cg.link(
            G, f"target-{i}", {f"source-{j}": ((i * 7 + j * 3) % 10) / 10 for j in range(10)}, "cos-avg", 2
        )
    return G


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_graph_writes_a_png_for_25_nodes(tmp_path):
    G = big_graph()
    assert G.number_of_nodes() == 25
    out = cg_plots().draw_graph(G, tmp_path / "pics" / "graph.png")
    assert _is_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["graph.png"]


def test_similarity_heatmap_writes_a_png_for_25_names(tmp_path):
    import torch

    names = [f"prompt-{i}" for i in range(25)]
    out = cg_plots().similarity_heatmap(torch.rand(25, 25), names, names, tmp_path / "heat.png", "cos-avg")
    assert _is_png(out)
    with pytest.raises(ValueError, match="shape \\[25, 25\\] but there are 3 row names"):
        cg_plots().similarity_heatmap(torch.rand(25, 25), names[:3], names, tmp_path / "x.png")


def test_similarity_heatmap_centre_diverges_blue_below_red_above(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    def reds_and_blues(path):
        rgb = imread(path)[..., :3]
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        return int((r - np.maximum(g, b) > 0.3).sum()), int((b - r > 0.3).sum())

    gains = np.array([[-0.12, 0.0, 0.04]])  # limits become +-0.12, so 0.04 is a pale red
    names = ["mnli"], ["a", "b", "c"]
    red, blue = reds_and_blues(cg_plots().similarity_heatmap(gains, *names, tmp_path / "g.png", centre=0.0))
    assert red > 50 and blue > 50  # the colour bar's ends and the -0.12 cell
    red, blue = reds_and_blues(cg_plots().similarity_heatmap(gains, *names, tmp_path / "v.png"))
    assert red == 0  # viridis has no red


def cg_plots():
    from composer import plots

    return plots
