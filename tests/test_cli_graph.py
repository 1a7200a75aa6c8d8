"""graph, similarity and eval --matrix commands on a tiny BERT library: JSON parsed, pictures, errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from composer.library import Library


def run(*args, ok=True):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def lib_graph(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lib = Library()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 32, generator=g)
    prompts = {"a-p": base, "b-p": base * 3 + 0.01 * torch.randn(4, 32, generator=g),
               "c-p": torch.randn(4, 32, generator=g), "t-p": base + 0.1 * torch.randn(4, 32, generator=g)}
    for n, p in prompts.items():
        lib.save(n, p, {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder", "head": "label-similarity"})
    y = tmp_path / "g.yaml"
    y.write_text("""name: g
nodes:
  - {name: a, role: source, task: toy, prompt: a-p}
  - {name: b, role: source, task: toy, prompt: b-p}
  - {name: c, role: source, task: toy, prompt: c-p}
  - {name: toy, role: target, task: toy, prompt: t-p}
""")
    return lib, y


def test_similarity_json_and_plot(lib_graph, tmp_path):
    out = json.loads(run("similarity", "a-p", "b-p", "c-p", "--metric", "cos-avg", "--json",
                         "--plot", tmp_path / "s.png").stdout)
    m = torch.tensor(out["matrix"])
    assert out["names"] == ["a-p", "b-p", "c-p"] and m.shape == (3, 3)
    torch.testing.assert_close(m, m.T) and torch.testing.assert_close(m.diag(), torch.ones(3))
    assert m[0, 1] > 0.99 and m[0, 1] > m[0, 2]  # b is a rescaled a: cosine ignores the scale
    assert (tmp_path / "s.png").stat().st_size > 1000
    on = json.loads(run("similarity", "--all", "--metric", "on", "--device", "cpu", "--json").stdout)
    assert len(on["names"]) == 4 and all(0 <= x <= 1.0001 for row in on["matrix"] for x in row)


def test_graph_link_show_draw(lib_graph, tmp_path):
    _, y = lib_graph
    r = json.loads(run("graph", "link", y, "--metric", "cos-avg", "--top-k", 2, "--out", tmp_path / "l.json",
                       "--json").stdout)
    assert list(r["scores"]["toy"])[:2] == ["a", "b"]
    shown = json.loads(run("graph", "show", tmp_path / "l.json", "--json").stdout)
    sim = [e for e in shown["edges"] if e["relation"] == "similar"]
    assert {e["source"] for e in sim} == {"a", "b"} and all(e["metric"] == "cos-avg" for e in sim)
    r = json.loads(run("graph", "link", y, "--metric", "transfer", "--top-k", 1, "--out", tmp_path / "t.json",
                       "--json").stdout)
    assert len(r["scores"]["toy"]) == 3 and all(0 <= v <= 1 for v in r["scores"]["toy"].values())
    run("graph", "draw", tmp_path / "l.json", "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert "ok" in run("graph", "validate", y).stdout


def test_eval_matrix(lib_graph):
    r = json.loads(run("eval", "--matrix", "--prompts", "a-p,c-p", "--tasks", "toy", "--json").stdout)
    assert r["prompts"] == ["a-p", "c-p"] and r["tasks"] == ["toy"] and len(r["scores"]) == 2
    assert all(0 <= row[0] <= 1 for row in r["scores"])


def err(r, code=1):
    assert r.exit_code == code, r.output
    e = r.stderr.strip()
    assert "\n" not in e and "Traceback" not in e
    return e


def test_bad_inputs(lib_graph, tmp_path):
    _, y = lib_graph
    assert "unknown metric 'jaccard'" in err(run("graph", "link", y, "--metric", "jaccard", "--out",
                                                 tmp_path / "x.json", ok=False))
    assert "--top-k must be a whole number >= 1, got 0" in err(run("graph", "link", y, "--top-k", 0, "--out",
                                                                   tmp_path / "x.json", ok=False))
    assert "no prompt 'ghost' in the library" in err(run("similarity", "a-p", "ghost", ok=False))
    for args in (["similarity", "--all", "--metric", "on"], ["graph", "link", y, "--metric", "transfer", "--out",
                                                              tmp_path / "x.json"]):
        assert "bad --device 'tpu'" in err(run(*args, "--device", "tpu", ok=False))
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [unclosed")
    assert "bad.yaml" in err(run("graph", "show", bad, ok=False))
    shape = tmp_path / "shape.yaml"
    shape.write_text("- just\n- a list\n")
    err(run("graph", "show", shape, ok=False))
    nl = tmp_path / "nl.json"
    nl.write_text(json.dumps({"directed": True, "multigraph": True, "graph": {}, "nodes": [{"id": "x"}], "edges": []}))
    err(run("graph", "show", nl, ok=False))


def test_validate_lists_faults(lib_graph, tmp_path):
    y = tmp_path / "faulty.yaml"
    y.write_text("""name: faulty
nodes:
  - {name: a, role: source, task: toy, prompt: a-p}
  - {name: b, role: subtask, task: no-such-task, prompt: gone}
  - {name: t, role: target, task: toy}
decomposition:
  t: [b, ghost]
similar:
  - {source: a, target: t, weight: .nan, metric: cos-avg}
""")
    r = run("graph", "validate", y, "--prompts", ok=False)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 4
    text = r.stderr
    assert "ghost" in text and "no-such-task" in text and "gone" in text and "finite" in text


def _untrained_graph(tmp_path, subtask_prompt="a-p"):
    y = tmp_path / "untrained.yaml"
    y.write_text(f"""name: untrained
nodes:
  - {{name: a, role: subtask, task: toy, prompt: {subtask_prompt}}}
  - {{name: c, role: source, task: toy, prompt: c-p}}
  - {{name: toy, role: target, task: toy, prompt: toy-composed}}
decomposition:
  toy: [a]
""")
    return y


def test_validate_notes_target_prompts_not_trained_yet(lib_graph, tmp_path):
    """A target's prompt missing from the library is the normal state before composing: one line, exit 0."""
    y = _untrained_graph(tmp_path)
    r = run("graph", "validate", y)
    out = r.stdout.strip()
    assert "\n" not in out and r.stderr.strip() == ""
    assert out.startswith("graph untrained: ok (3 nodes, 1 edges)")
    assert "1 target prompt(s) not trained yet: toy-composed" in out and "--strict" in out
    d = json.loads(run("graph", "validate", y, "--json").stdout)
    assert d["ok"] is True and d["faults"] == [] and d["untrained"] == ["toy-composed"]


def test_validate_strict_fails_on_untrained_targets(lib_graph, tmp_path):
    y = _untrained_graph(tmp_path)
    r = run("graph", "validate", y, "--strict", ok=False)
    assert r.exit_code == 1
    assert r.stderr.strip() == ("node 'toy': prompt 'toy-composed' is not in the library (train it, or fix the "
                                "name)")
    d = json.loads(run("graph", "validate", y, "--strict", "--json", ok=False).stdout)
    assert d["ok"] is False and d["untrained"] == [] and len(d["faults"]) == 1


def test_validate_missing_subtask_prompt_stays_a_fault(lib_graph, tmp_path):
    y = _untrained_graph(tmp_path, subtask_prompt="never-trained")
    r = run("graph", "validate", y, ok=False)
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "node 'a': prompt 'never-trained' is not in the library (train it, or fix the name)"
    assert lines[1].startswith("1 target prompt(s) not trained yet: toy-composed") and len(lines) == 2


def test_validate_checks_a_target_prompt_that_exists(lib_graph, tmp_path, tiny_bert_dir):
    """Leniency is for prompts not trained yet: a target's prompt that is there is still checked."""
    lib, _ = lib_graph
    lib.save("wide-t", torch.zeros(4, 48), {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder"})
    y = tmp_path / "wide.yaml"
    y.write_text("""name: wide
nodes:
  - {name: a, role: subtask, task: toy, prompt: a-p}
  - {name: toy, role: target, task: toy, prompt: wide-t}
decomposition:
  toy: [a]
""")
    r = run("graph", "validate", y, ok=False)
    assert r.exit_code == 1 and "prompts of different hidden sizes on one graph" in r.stderr


def test_validate_untrained_ok_in_the_library():
    """composer.graph.validate(untrained_ok=roles): those roles' prompts may be absent; others may not."""
    import networkx as nx

    from composer import graph as cg

    class Lib:
        def exists(self, name):
            return name == "have"

        def meta(self, name):
            return {"hidden_size": 8, "backbone": "m"}

    G = nx.MultiDiGraph(name="g")
    G.add_node("s", role="subtask", task="s", prompt="have")
    G.add_node("u", role="source", task="u", prompt="gone")
    G.add_node("t", role="target", task="t", prompt="later")
    G.add_edge("s", "t", key="part_of", relation="part_of")
    strict = cg.validate(G, library=Lib())
    assert [f.split(":")[0] for f in strict] == ["node 'u'", "node 't'"]
    assert cg.validate(G, library=Lib(), untrained_ok=("target",)) == [strict[0]]
