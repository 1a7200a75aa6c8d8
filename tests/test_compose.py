"""The composer end to end on a tiny BERT: candidates, every strategy, saving, continuing, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from composer.compose import ComposeConfig, compose
from composer.errors import ComposeError
from composer.library import Library
from composer.train import TrainConfig, train


def graph_yaml(tmp_path, extra_nodes="", decomposition="toy: [pos, neg]", similar=""):
    p = tmp_path / "g.yaml"
    p.write_text(f"""name: g
nodes:
  - {{name: pos, role: subtask, task: toy, prompt: pos-p}}
  - {{name: neg, role: subtask, task: toy, prompt: neg-p}}
  - {{name: other, role: source, task: toy, prompt: other-p}}
  - {{name: toy, role: target, task: toy}}
{extra_nodes}decomposition:
  {decomposition}
similar:
  - {{source: other, target: toy, weight: 0.5, metric: cos-avg}}
{similar}""")
    return p


@pytest.fixture
def setup(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./tasks/toy.yaml resolves the task name
    lib = Library()
    g = torch.Generator().manual_seed(0)
    for name in ("pos-p", "neg-p", "other-p"):
        lib.save(name, torch.randn(4, 32, generator=g) * 0.1,
                 {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder", "head": "label-similarity"})
    return lib, graph_yaml(tmp_path), tiny_bert_dir


def cc(g, **kw):
    base = dict(graph=str(g), target="toy", shots=4, seed=0)
    base.update(kw)
    return ComposeConfig(**base)


def test_candidates_are_subtasks_then_top_sources(setup):
    lib, g, _ = setup
    r = compose(cc(g, strategy="average", top_k=1))
    assert r["candidates"] == ["pos", "neg", "other"] and r["relations"] == ["part_of", "part_of", "similar"]
    assert sum(r["weights"]) == pytest.approx(1.0)
    assert compose(cc(g, strategy="average", top_k=0))["candidates"] == ["pos", "neg"]


def test_concat_joins_subtasks_in_order(setup):
    lib, g, _ = setup
    r = compose(cc(g, strategy="concat", save="toy-cat"))
    e = lib.load("toy-cat")
    assert r["shape"] == [8, 32] and e.prompt.shape == (8, 32)
    assert torch.equal(e.prompt[:4], lib.load("pos-p").prompt) and torch.equal(e.prompt[4:], lib.load("neg-p").prompt)
    assert e.meta["provenance"]["strategy"] == "concat" and e.meta["provenance"]["candidates"] == ["pos", "neg"]


@pytest.mark.parametrize("strategy", ["best", "linear", "attention"])
def test_model_based_strategies_save_with_provenance(setup, strategy, tmp_path):
    lib, g, _ = setup
    r = compose(cc(g, strategy=strategy, save=f"toy-{strategy}", out_graph=str(tmp_path / "out.json"), steps=3))
    e = lib.load(f"toy-{strategy}")
    prov = e.meta["provenance"]
    assert e.prompt.shape == (4, 32) and prov["strategy"] == strategy and prov["shots"] == 4
    assert prov["weights"] == r["weights"] and len(r["weights"]) == 3
    if strategy == "best":
        assert sorted(r["weights"]) == [0.0, 0.0, 1.0] and len(r["scores"]) == 3
    if strategy == "linear":
        assert {"loss", "converged", "weights"} <= set(r["optimizer"])
    if strategy == "attention":
        assert e.extra("composer") is not None and set(r["per_class"]) == {"0", "1"}
        assert 0 < r["target_weight"] < 1
    saved = json.loads((tmp_path / "out.json").read_text())
    on_edges = [d for d in saved["edges"] if f"composed:{strategy}" in d]
    assert len(on_edges) == 3


def test_linear_weights_stay_in_the_box_given(setup):
    lib, g, _ = setup
    r = compose(cc(g, strategy="linear", min_weight=0.5, max_weight=0.9))
    assert len(r["weights"]) == 3 and all(0.5 <= w <= 0.9 for w in r["weights"])
    r = compose(cc(g, strategy="linear", min_weight=0.0, save="toy-lin-nonneg"))
    assert all(w >= 0 for w in r["weights"])
    assert lib.load("toy-lin-nonneg").meta["config"]["min_weight"] == 0.0


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_linear_box_must_be_a_finite_range(setup, lo, hi):
    _, g, _ = setup
    with pytest.raises(ComposeError, match="--min-weight must be below --max-weight"):
        cc(g, strategy="linear", min_weight=lo, max_weight=hi)


def test_attention_composer_continues_in_training_and_eval(setup, toy_task, tmp_path):
    lib, g, bert = setup
    compose(cc(g, strategy="attention", save="toy-att"))
    r = train(TrainConfig(task="toy", backbone=str(bert), init="library:toy-att", steps=4, eval_every=2, batch_size=8,
                          run_dir=str(tmp_path / "run"), save="toy-att-tuned"), progress=False)
    e = lib.load("toy-att-tuned")
    assert e.extra("composer") is not None and e.meta["provenance"]["init"] == "library"
    assert r["steps"] == 4
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "run/checkpoint/trainable.safetensors")))
    assert "prompt_source.composer.target_prompt" in names and "prompt_source.composer.down.weight" in names
    from click.testing import CliRunner

    from cli import cli

    out = CliRunner().invoke(cli, ["eval", "toy-att-tuned", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["score"] == pytest.approx(r["dev"]["score"])


def test_distilled_attention_exports_to_peft(setup, tmp_path):
    lib, g, _ = setup
    compose(cc(g, strategy="attention", save="att"))
    compose(cc(g, strategy="attention", save="att-d", distill=True))
    from composer.errors import LibraryError
    from composer.peft_io import export_peft

    with pytest.raises(LibraryError, match="attention composer"):
        export_peft(lib, "att", tmp_path / "peft-a")
    assert (export_peft(lib, "att-d", tmp_path / "peft-d") / "adapter_config.json").exists()
    assert lib.load("att-d").extra("composer") is None


def test_missing_prompts_listed(setup, tmp_path):
    lib, _, _ = setup
    lib.remove("neg-p")
    g = graph_yaml(tmp_path, extra_nodes="  - {name: bare, role: subtask, task: toy}\n",
                   decomposition="toy: [pos, neg, bare]")
    with pytest.raises(ComposeError, match=r"missing from the library .*neg \(prompt 'neg-p'\); bare \(no prompt set\)"):
        compose(cc(g, strategy="average"))


def test_bad_targets_and_mixed_candidates(setup, tmp_path, tiny_bert_dir):
    lib, g, _ = setup
    with pytest.raises(ComposeError, match="target 'nope' is not in graph 'g'"):
        compose(cc(g, target="nope", strategy="average"))
    with pytest.raises(ComposeError, match="unknown --strategy 'magic'"):
        cc(g, strategy="magic")
    lib.save("neg-p", torch.zeros(6, 32), {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder"})
    with pytest.raises(ComposeError, match=r"differ in prompt length: pos-p=4, neg-p=6"):
        compose(cc(g, strategy="average"))
    assert compose(cc(g, strategy="concat"))["shape"] == [10, 32]  # concat takes mixed lengths
    lib.save("neg-p", torch.zeros(4, 48), {"task": "toy", "backbone": "other", "family": "encoder"})
    with pytest.raises(ComposeError, match=r"differ in hidden size: pos-p=32, neg-p=48"):
        compose(cc(g, strategy="average"))


def test_no_candidates_and_too_many_shots(setup, tmp_path):
    lib, g, _ = setup
    lone = tmp_path / "lone.yaml"
    lone.write_text("name: lone\nnodes:\n  - {name: toy, role: target}\n")
    with pytest.raises(ComposeError, match="has no candidates"):
        compose(cc(lone, strategy="average"))
    with pytest.raises(ComposeError, match="concat needs subtasks"):
        compose(cc(lone, strategy="concat"))
    with pytest.raises(ComposeError, match=r"--shots 500 is larger than class '0' .*\(120 examples\)"):
        compose(cc(g, strategy="best", shots=500))


@pytest.mark.parametrize("device,msg", [
    ("tpu", "bad --device 'tpu'"),
    ("meta", "bad --device 'meta'"),
    ("cuda:99", "--device cuda:99: this machine has"),
])
def test_bad_device_is_refused_before_loading(setup, device, msg):
    from composer.errors import BackboneError

    _, g, _ = setup
    with pytest.raises(BackboneError, match=msg):
        cc(g, strategy="linear", device=device)


@pytest.mark.parametrize("strategy", ["best", "linear", "attention"])
def test_backbone_runs_where_device_says(setup, strategy, monkeypatch):
    """auto picks CUDA when there is one (else the CPU); every strategy that runs the model gives the same weights
    on the device it picked as on the CPU, up to float rounding: on CUDA the two tuning steps' Adam updates
    round differently (about 1e-3 in the weights), and best's few-step scores are accuracies on the shots,
    which may differ there by a shot or two and so flip a near-tie."""
    import composer.compose as C

    _, g, _ = setup
    placed = []
    real = C.load_backbone

    def spy(*a, **kw):
        bb = real(*a, **kw)
        placed.append(bb)
        return bb

    monkeypatch.setattr(C, "load_backbone", spy)
    on_cpu = compose(cc(g, strategy=strategy, device="cpu", steps=2))
    auto = compose(cc(g, strategy=strategy, device="auto", steps=2))
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert [next(bb.network.parameters()).device.type for bb in placed] == ["cpu", want]
    if want == "cpu":  # the same device twice: the same numbers
        assert auto == on_cpu
    elif strategy == "best":
        shot = 1 / on_cpu["shots"]
        assert auto["scores"] == pytest.approx(on_cpu["scores"], abs=2 * shot + 1e-9)
        assert auto["weights"][max(range(len(auto["scores"])), key=auto["scores"].__getitem__)] == 1.0
    else:
        assert auto["weights"] == pytest.approx(on_cpu["weights"], abs=1e-2)


def test_best_by_few_step_score(setup, monkeypatch):
    """best with steps > 0 tunes each candidate on the shots before scoring it; it saves the candidate as it was."""
    import composer.compose as C

    lib, g, _ = setup
    moved, real = [], C._fit

    def spy(pm, enc, steps, *a, **kw):
        before = pm.prompt_source.weight.detach().clone()
        real(pm, enc, steps, *a, **kw)
        moved.append((steps, len(enc), float((pm.prompt_source.weight.detach() - before).abs().max())))

    monkeypatch.setattr(C, "_fit", spy)
    tuned = compose(cc(g, strategy="best", steps=5, lr=0.5, save="toy-best5"))
    assert len(moved) == 3 and all(s == 5 and n == 8 and d > 0 for s, n, d in moved)  # 4 shots x 2 classes
    i = tuned["weights"].index(1.0)
    assert len(tuned["scores"]) == 3 and tuned["scores"][i] == max(tuned["scores"])
    assert torch.equal(lib.load("toy-best5").prompt, lib.load(["pos-p", "neg-p", "other-p"][i]).prompt)
    assert compose(cc(g, strategy="best", steps=5, lr=0.5))["scores"] == tuned["scores"]  # seeded
    compose(cc(g, strategy="best"))
    assert len(moved) == 6  # steps=0: the zero-shot score, nothing tuned
    with pytest.raises(ComposeError, match="--steps must be >= 0"):
        cc(g, strategy="best", steps=-1)
