"""Multi-task training on a tiny BERT: temperature sampling, routing, mixed heads, per-task bests, resume."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import composer.multitask as M
from composer.errors import TrainingError
from composer.library import Library
from composer.multitask import MultiTaskConfig, train_multitask
from composer.runstate import MixturePlan, mixture_weights
from tests.conftest import BAD, GOOD, THINGS, ctrl_c_at_step, write_toy_task

MEH = ["ok", "average", "plain", "middling"]


def write_toy3(root: Path, name: str = "toy3", n: int = 48, seed: int = 1) -> Path:
    """A three-class task (bad / good / so-so) with a linear head: another head and label set than toy."""
    rng = random.Random(seed)
    data = root / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n), ("dev", n // 4), ("test", n // 4)):
        lines = ["text,label"]
        for i in range(size):
            y = i % 3
            lines.append(f"the {rng.choice(THINGS)} was {rng.choice((BAD, GOOD, MEH)[y])},{y}")
        (data / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "tasks").mkdir(exist_ok=True)
    path = root / "tasks" / f"{name}.yaml"
    path.write_text(f"""name: {name}
data:
  source: files
  format: csv
  splits: {{train: {name}/train.csv, dev: {name}/dev.csv, test: {name}/test.csv}}
inputs: [text]
template: "{{text}}"
labels: ["0", "1", "2"]
head: linear
metric: accuracy
max_length: 32
""")
    return path


@pytest.fixture
def tasks(tmp_path, monkeypatch) -> list[str]:
    a = write_toy_task(tmp_path, n=80)
    b = write_toy3(tmp_path)
    monkeypatch.setenv("PROMPT_COMPOSER_DATA", str(tmp_path / "data"))
    return [str(a), str(b)]


def mcfg(tasks, tiny_bert_dir, tmp_path, **kw) -> MultiTaskConfig:
    base = {"tasks": tasks, "backbone": str(tiny_bert_dir), "prompt_length": 4, "steps": 6, "batch_size": 8,
            "lr": 0.1, "eval_every": 3, "max_eval": 12, "eval_batch_size": 16, "seed": 0,
            "run_dir": str(tmp_path / "run")}
    return MultiTaskConfig(**{**base, **kw})


def checkpoint(run_dir) -> dict[str, torch.Tensor]:
    return load_file(f"{run_dir}/checkpoint/trainable.safetensors")


# -- sampling -------------------------------------------------------------------------------------
def test_mixture_weights_follow_the_formula():
    n = torch.tensor([100.0, 400.0, 25.0], dtype=torch.float64)
    torch.testing.assert_close(mixture_weights([100, 400, 25], 1.0), n / n.sum())
    torch.testing.assert_close(mixture_weights([100, 400, 25], 2.0), n.sqrt() / n.sqrt().sum())
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(mixture_weights([100, 400, 25], 1e9), uniform)
    assert mixture_weights([1, 10], 0.05).tolist()[1] == pytest.approx(1.0)  # small T: the largest task only


@pytest.mark.parametrize("T", [1.0, 2.0, 1e6])
def test_sampled_proportions_match_the_temperature(T):
    sizes = [100, 400, 25]
    plan = MixturePlan(sizes, batch_size=64, seed=0, temperature=T)
    counts = [0, 0, 0]
    for s in range(250):  # 16,000 positions
        for t, _ in plan.indices(s):
            counts[t] += 1
    freq = [c / sum(counts) for c in counts]
    expected = [n ** (1 / T) / sum(m ** (1 / T) for m in sizes) for n in sizes]
    assert freq == pytest.approx(expected, abs=0.015)
    if T == 1e6:
        assert freq == pytest.approx([1 / 3] * 3, abs=0.015)


def test_mixture_plan_is_a_function_of_the_step():
    a, b = MixturePlan([10, 7], 4, seed=3, temperature=1.0), MixturePlan([10, 7], 4, seed=3, temperature=1.0)
    seq = [a.indices(s) for s in range(20)]
    assert [b.indices(s) for s in (17, 2, 19, 0)] == [seq[17], seq[2], seq[19], seq[0]]
    for t, n in enumerate([10, 7]):  # each task walks its own permutation: every example once per epoch
        stream = [i for step in seq for task, i in step if task == t]
        assert sorted(stream[:n]) == list(range(n))
    assert MixturePlan([10, 7], 4, seed=4, temperature=1.0).indices(0) != seq[0] or \
        MixturePlan([10, 7], 4, seed=4, temperature=1.0).indices(1) != seq[1]


@pytest.mark.parametrize("T", [0.0, -1.0, float("nan")])
def test_temperature_must_be_positive(T):
    with pytest.raises(TrainingError, match=r"--temperature must be > 0 .* got"):
        MultiTaskConfig(tasks=["a", "b"], sampling_temperature=T)


@pytest.mark.parametrize("kw,msg", [
    ({}, "needs either --tasks a,b,... or --graph G"),
    ({"tasks": ["a"], "graph": "g"}, "needs either --tasks"),
    ({"tasks": "a,b", "composer": "soup"}, "unknown --composer 'soup'"),
    ({"tasks": "a,b", "composer": "attention", "init": "vocab"}, "--init vocab does not apply"),
    ({"tasks": "a,b", "steps": 0}, "--steps must be positive"),
    ({"tasks": "a,b", "mode": "joint", "model_lr": 0.0}, "--model-lr is 0.0"),
    ({"tasks": "a,b", "shared": "soup"}, "unknown --shared 'soup'"),
    ({"tasks": "a,b", "shared": "mixture", "composer": "attention"}, "--shared mixture with --composer attention"),
    ({"tasks": "a,b", "shared": "mixture", "init": "library"}, "trains one prompt for all"),
])
def test_bad_config(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        MultiTaskConfig(**kw)


# -- the model ------------------------------------------------------------------------------------
def _rows(prep, idx, pad):
    b = prep.train.batch(idx, pad)
    return [(b["input_ids"][j : j + 1, : int(b["attention_mask"][j].sum())], prep.train.labels[i])
            for j, i in enumerate(idx)]


def test_mixed_batch_routes_each_example_to_its_task_prompt(tasks, tiny_bert_dir, tmp_path):
    from composer.encoding import pad_batch
    from composer.model import PromptedModel
    from composer.prompts import SoftPrompt

    mp = M.prepare_multitask(mcfg(tasks, tiny_bert_dir, tmp_path))
    model = mp.model
    with torch.no_grad():
        model.prompts["toy"].weight.zero_()
        model.prompts["toy3"].weight.copy_(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 3)
    model.eval()
    pad = mp.backbone.tokenizer.pad_token_id
    # rows of both tasks, interleaved: A B B A B A
    a, b = mp.tasks["toy"].train, mp.tasks["toy3"].train
    layout = [("toy", a, 0), ("toy3", b, 0), ("toy3", b, 1), ("toy", a, 1), ("toy3", b, 2), ("toy", a, 2)]
    ids, mask = pad_batch([enc.ids[i] for _, enc, i in layout], pad)
    task_ids = torch.tensor([model.tasks.index(t) for t, _, _ in layout])
    with torch.no_grad():
        logits = model(ids, mask, task_ids)  # [6, 3]
    assert logits.shape == (6, 3)
    refs = {t: PromptedModel(mp.backbone, SoftPrompt(model.prompts[t].weight.detach().clone()),
                             model.heads[t]).eval() for t in ("toy", "toy3")}
    wrong = {"toy": refs["toy3"].prompt_source.weight, "toy3": refs["toy"].prompt_source.weight}
    for row, (t, enc, i) in enumerate(layout):
        x = torch.tensor([enc.ids[i]])
        with torch.no_grad():
            ref = refs[t](x, torch.ones_like(x))[0]  # the row alone, through a single-task model
            other = refs[t](x, torch.ones_like(x), prompt=wrong[t])[0]
        C = len(ref)
        torch.testing.assert_close(logits[row, :C], ref, rtol=1e-5, atol=1e-5)
        assert (logits[row, C:] == float("-inf")).all()
        assert (other - ref).abs().max() > 1e-3  # the other task's prompt would have given other logits


def test_tasks_with_different_heads_train_in_one_batch(tasks, tiny_bert_dir, tmp_path):
    from composer.loop import param_groups

    cfg = mcfg(tasks, tiny_bert_dir, tmp_path)
    mp = M.prepare_multitask(cfg)
    model = mp.model
    assert model.heads["toy"].kind == "label-similarity" and model.heads["toy3"].kind == "linear"
    param_groups(cfg, model)  # freezes the backbone (prompt mode)
    pairs = [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]
    b = M._batch(mp, model.tasks, pairs, mp.backbone.tokenizer.pad_token_id)
    loss = F.cross_entropy(model(b["input_ids"], b["attention_mask"], b["task_ids"]), b["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("prompts.toy.weight", "prompts.toy3.weight", "heads.toy3.proj.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.network.parameters())


# -- training -------------------------------------------------------------------------------------
def test_train_keeps_a_best_checkpoint_and_library_entry_per_task(tasks, tiny_bert_dir, tmp_path):
    cfg = mcfg(tasks, tiny_bert_dir, tmp_path, sampling_temperature=2.0, save_prefix="mt-")
    r = train_multitask(cfg, progress=False)
    assert r["tasks"] == ["toy", "toy3"] and r["steps"] == 6
    assert r["probabilities"]["toy"] == pytest.approx(math.sqrt(80) / (math.sqrt(80) + math.sqrt(48)))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" in x] == [0, 3, 6]
    assert set(lines[0]["eval"]) == {"toy", "toy3"}
    lib = Library()
    for t in ("toy", "toy3"):
        pt = r["per_task"][t]
        assert pt["saved"] == f"mt-{t}" and pt["best_step"] in (0, 3, 6) and 0 <= pt["dev"]["score"] <= 1
        best = load_file(str(tmp_path / "run" / "best" / t / "trainable.safetensors"))
        e = lib.load(f"mt-{t}")
        torch.testing.assert_close(e.prompt, best[f"prompts.{t}.weight"])  # the library holds the task's best
        assert e.meta["task"] == t and e.meta["backbone"] == str(tiny_bert_dir)
        assert e.meta["provenance"]["multitask"] == ["toy", "toy3"]
        assert e.meta["provenance"]["temperature"] == 2.0
    assert lib.load("mt-toy3").extra("head") is not None  # the linear head is kept beside its prompt


def test_max_test_caps_each_tasks_final_evaluation(tasks, tiny_bert_dir, tmp_path):
    """--max-test evaluates a seeded subset of each task's dev and test splits at the end of a multitask run."""
    whole = train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, steps=3, run_dir=str(tmp_path / "w")),
                            progress=False)
    capped = train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, steps=3, max_test=5, run_dir=str(tmp_path / "c")),
                             progress=False)
    for t in ("toy", "toy3"):
        assert whole["per_task"][t]["dev"]["n"] > 5 and whole["per_task"][t]["test"]["n"] > 5
        assert capped["per_task"][t]["dev"]["n"] == 5 and capped["per_task"][t]["test"]["n"] == 5
    with pytest.raises(TrainingError, match=r"--max-test must be positive.*got -1"):
        mcfg(tasks, tiny_bert_dir, tmp_path, max_test=-1)


def test_interrupt_then_resume_equals_uninterrupted(tasks, tiny_bert_dir, tmp_path, monkeypatch):
    train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "full")), progress=False)
    restore = ctrl_c_at_step(monkeypatch, M, 4)
    with pytest.raises(TrainingError, match=r"interrupted at step 4; continue with --resume .*cut"):
        train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "cut")), progress=False)
    restore()
    r = train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, run_dir=None), resume=tmp_path / "cut",
                        progress=False)
    assert r["steps"] == 6
    full, cut = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "cut")
    assert set(full) == set(cut) == {"prompts.toy.weight", "prompts.toy3.weight", "heads.toy3.proj.weight",
                                     "heads.toy3.proj.bias"}
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=1e-6)


def test_resume_refuses_another_run(tasks, tiny_bert_dir, tmp_path):
    from composer.train import TrainConfig, train

    train(TrainConfig(task=tasks[0], backbone=str(tiny_bert_dir), prompt_length=4, steps=1, eval_every=1,
                      max_eval=8, batch_size=4, run_dir=str(tmp_path / "single")), progress=False)
    with pytest.raises(TrainingError, match="that is a single-task run"):
        train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path), resume=tmp_path / "single", progress=False)
    (tmp_path / "multi").mkdir()
    other = mcfg(tasks[:1], tiny_bert_dir, tmp_path).to_dict()
    (tmp_path / "multi" / "config.json").write_text(json.dumps(other))
    with pytest.raises(TrainingError, match="that run has tasks"):
        train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path), resume=tmp_path / "multi", progress=False)


# -- library prompts and the shared attention module ----------------------------------------------------
def _save_prompt(name: str, backbone: str, P: int = 4, H: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Library().save(name, torch.randn(P, H, generator=g) * 0.05,
                   {"task": "toy", "backbone": backbone, "family": "encoder", "head": "label-similarity"})


def test_library_prompts_on_another_backbone_are_refused(tasks, tiny_bert_dir, tmp_path):
    _save_prompt("far", "minilm")  # same hidden size and family, other backbone
    graph = tmp_path / "g.yaml"
    graph.write_text(f"""name: g
nodes:
  - {{name: toy, role: source, task: {tasks[0]}, prompt: far}}
  - {{name: toy3, role: target, task: {tasks[1]}}}
""")
    msg = r"prompt 'far' was trained on backbone 'minilm', but this multitask run shares one backbone"
    with pytest.raises(TrainingError, match=msg):
        train_multitask(mcfg(None, tiny_bert_dir, tmp_path, graph=str(graph), init="library"), progress=False)
    with pytest.raises(TrainingError, match=msg):
        train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, init="library:far"), progress=False)
    with pytest.raises(TrainingError, match=msg):
        train_multitask(mcfg(None, tiny_bert_dir, tmp_path, graph=str(graph), composer="attention"),
                        progress=False)
    with pytest.raises(TrainingError, match="attends over frozen source prompts, and there are none"):
        train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, composer="attention"), progress=False)


def test_attention_module_is_shared_across_tasks(tasks, tiny_bert_dir, tmp_path):
    from composer.attention import load_source

    _save_prompt("src-a", str(tiny_bert_dir), seed=1)
    _save_prompt("src-b", str(tiny_bert_dir), seed=2)
    cfg = mcfg(tasks, tiny_bert_dir, tmp_path, composer="attention", sources="src-a,src-b", attention_rank=4,
               steps=2, eval_every=2, save_prefix="att-")
    mp = M.prepare_multitask(cfg)
    comps = [mp.model.prompts[t].composer for t in ("toy", "toy3")]
    assert comps[0].down is comps[1].down is mp.model.shared["down"]
    assert comps[0].target_prompt is not comps[1].target_prompt
    before = mp.model.shared["down"].weight.detach().clone()
    r = train_multitask(cfg, prepared=mp, progress=False)
    assert r["sources"] == ["src-a", "src-b"]
    ck = checkpoint(tmp_path / "run")
    assert {"shared.down.weight", "shared.up.weight", "prompts.toy.composer.target_prompt",
            "prompts.toy3.composer.target_prompt"} <= set(ck)
    assert not any(k.startswith("prompts.") and k.endswith("down.weight") for k in ck)  # one copy: shared.*
    assert not torch.equal(ck["shared.down.weight"], before)
    e = Library().load("att-toy3")
    prov = e.meta["provenance"]
    assert prov["strategy"] == "attention" and prov["multitask"] == ["toy", "toy3"]
    src = load_source(e)  # the composer, shared module included, loads back as a prompt source
    torch.testing.assert_close(src.composer.down.weight, mp.model.shared["down"].weight.detach().cpu())


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_shared_mixture_trains_one_prompt_for_every_task(tasks, tiny_bert_dir, tmp_path, kind):
    """--shared mixture (SPoT's multi-task source): one prompt source under every task, each task its own head;
    PREFIX+shared is the snapshot at the eval with the best mean dev score, and it loads as a single-task init."""
    from composer.train import TrainConfig, prepare

    cfg = mcfg(tasks, tiny_bert_dir, tmp_path, shared="mixture", kind=kind, save_prefix="mix-", eval_every=2)
    mp = M.prepare_multitask(cfg)
    assert mp.model.prompts["toy"] is mp.model.prompts["toy3"]
    assert mp.model.view("toy").head is not mp.model.view("toy3").head
    before = mp.model.prompts["toy"].static().clone()
    r = train_multitask(cfg, prepared=mp, progress=False)
    ck = checkpoint(tmp_path / "run")
    assert not any(k.startswith("prompts.toy3.") for k in ck) and any(k.startswith("prompts.toy.") for k in ck)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    means = {x["step"]: x["mean"] for x in evals if "eval" in x}
    assert list(means) == [0, 2, 4, 6]
    best = max(means, key=lambda s: (means[s], -s))  # the first eval to reach the best mean
    assert r["shared_saved"] == "mix-shared" and r["shared_best_step"] == best
    assert r["shared_best_mean"] == pytest.approx(means[best])
    e = Library().load("mix-shared")
    snap = load_file(str(tmp_path / "run" / "best" / "shared" / "trainable.safetensors"))
    name = "prompts.toy.weight"
    torch.testing.assert_close(e.prompt, snap[name])
    assert e.meta["kind"] == kind and e.meta["task"] is None and e.meta["head"] is None
    assert e.meta["provenance"]["shared"] == "mixture" and e.meta["provenance"]["tasks"] == ["toy", "toy3"]
    assert e.meta["metrics"]["best_step"] == best
    best_eval = next(x for x in evals if x.get("step") == best and "eval" in x)["eval"]
    assert e.meta["metrics"]["dev"] == {t: best_eval[t]["score"] for t in ("toy", "toy3")}  # each task's score there
    last = ck[name]  # the run's last state: the prompt trained
    assert not torch.equal(last, before)
    for t in ("toy", "toy3"):  # each task's own entry: the shared prompt at that task's best eval, its own head
        assert Library().load(f"mix-{t}").meta["task"] == t
    tc = TrainConfig(task=tasks[1], backbone=str(tiny_bert_dir), prompt_length=4, kind=kind, init="library:mix-shared",
                     steps=1, run_dir=str(tmp_path / "single"))
    torch.testing.assert_close(prepare(tc).model.prompt_source.static(), e.prompt)


def test_shared_mixture_resume_equals_uninterrupted(tasks, tiny_bert_dir, tmp_path, monkeypatch):
    """The best mean and its snapshot survive an interrupt: the resumed run saves the same shared entry."""
    def run(name, **kw):
        return train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mixture", eval_every=2,
                                    save_prefix=name, **kw), progress=False, **({"resume": tmp_path / "cut"}
                                                                                if name == "b-" else {}))

    full = run("a-", run_dir=str(tmp_path / "full"))
    restore = ctrl_c_at_step(monkeypatch, M, 5)
    with pytest.raises(TrainingError, match="interrupted at step 5"):
        run("c-", run_dir=str(tmp_path / "cut"))
    restore()
    resumed = run("b-", run_dir=None)
    assert resumed["shared_best_step"] == full["shared_best_step"]
    torch.testing.assert_close(Library().load("b-shared").prompt, Library().load("a-shared").prompt,
                               rtol=0, atol=1e-6)


def test_gradient_checkpointing_run_matches(tasks, tiny_bert_dir, tmp_path):
    """--gradient-checkpointing reaches multitask runs too, and changes memory, not the numbers."""
    train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, steps=3, run_dir=str(tmp_path / "a")), progress=False)
    cfg = mcfg(tasks, tiny_bert_dir, tmp_path, steps=3, run_dir=str(tmp_path / "b"), gradient_checkpointing=True)
    seen = []
    import composer.loop as L  # the shared optimizer set-up turns it on for both kinds of run

    real = L.set_activation_checkpointing

    def spy(backbone, on):
        seen.append(on)
        real(backbone, on)

    L.set_activation_checkpointing = spy
    try:
        train_multitask(cfg, progress=False)
    finally:
        L.set_activation_checkpointing = real
    assert seen == [True]
    a, b = checkpoint(tmp_path / "a"), checkpoint(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_config_shares_the_single_task_settings():
    """MultiTaskConfig is a TuningConfig: the shared settings, its own defaults, and the same checks."""
    import dataclasses

    from composer.config import TrainConfig, TuningConfig

    c = MultiTaskConfig(tasks="a,b", label_temperature=0.2, patience=2, gradient_checkpointing=True)
    assert isinstance(c, TuningConfig) and (c.steps, c.batch_size, c.sampling_temperature) == (1000, 32, 1.0)
    assert (c.label_temperature, c.patience, c.gradient_checkpointing) == (0.2, 2, True)
    shared = {f.name for f in dataclasses.fields(TuningConfig)}
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(MultiTaskConfig)}
    assert c.backbone is None  # the graph's backbone, else minilm, is filled in by prepare_multitask
    assert MultiTaskConfig.from_dict(c.to_dict()) == c
    with pytest.raises(TrainingError, match="--label-temperature must be > 0"):
        MultiTaskConfig(tasks="a,b", label_temperature=-1.0)
