"""MPT (composer/mpt.py): the decomposition math, distillation from the tasks' own prompts, the shared entry,
the target's init from it, and the bad inputs, on a tiny BERT (and a tiny Llama for generation)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import composer.multitask as M
from composer.backbones import load_backbone
from composer.config import MultiTaskConfig, TrainConfig
from composer.encoding import pad_batch
from composer.errors import ComposerError, TrainingError
from composer.library import Library
from composer.mpt import MPTPrompt, MPTTaskSource, generate_mixed, mpt_prompts
from composer.prompts import init_prompt
from composer.runstate import load_trainable
from composer.train import train
from tests.test_multitask import mcfg, tasks  # noqa: F401  (the two-task fixture: toy + toy3)


# -- the math -------------------------------------------------------------------------------------
def test_decomposition_gives_each_row_its_tasks_prompt():
    g = torch.Generator().manual_seed(0)
    K, P, H = 3, 4, 6
    shared, u, v = torch.randn(P, H, generator=g), torch.randn(K, P, 1, generator=g), torch.randn(K, 1, H, generator=g)
    ids = torch.tensor([2, 0, 0, 1, 2])
    out = mpt_prompts(shared, u, v, ids)  # [B, P, H]
    assert out.shape == (5, P, H)
    for row, k in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], shared * torch.outer(u[k, :, 0], v[k, 0]))  # P* ∘ (u_k v_kᵀ)
    # rank r: u_k v_k is a [P, r] @ [r, H] product
    u2, v2 = torch.randn(K, P, 2, generator=g), torch.randn(K, 2, H, generator=g)
    torch.testing.assert_close(mpt_prompts(shared, u2, v2, ids)[0], shared * (u2[2] @ v2[2]))
    # factors at ones: every task is P* itself
    assert torch.equal(MPTPrompt(shared, K)(ids), shared.expand(5, P, H))


def test_decomposition_of_a_prefix_scales_each_layer_row():
    g = torch.Generator().manual_seed(1)
    L, P, D, K = 2, 3, 8, 2
    shared = torch.randn(L, 2, P, D, generator=g)
    N = L * 2 * P  # a prefix is N per-layer prompt rows of width D
    u, v = torch.randn(K, N, 1, generator=g), torch.randn(K, 1, D, generator=g)
    out = mpt_prompts(shared, u, v, torch.tensor([1, 0]))
    assert out.shape == (2, L, 2, P, D)
    want = (shared.reshape(N, D) * torch.outer(u[1, :, 0], v[1, 0])).reshape(L, 2, P, D)
    torch.testing.assert_close(out[0], want)
    src = MPTTaskSource(MPTPrompt(shared, K, u, v), 1)
    assert src.kind == "prefix" and src(torch.zeros(3, 5, 32)).shape == (3, L, 2, P, D)


def test_decomposition_refuses_bad_ids_and_shapes():
    shared, u, v = torch.ones(4, 6), torch.ones(2, 4, 1), torch.ones(2, 1, 6)
    with pytest.raises(ComposerError, match=r"task ids must be in \[0, 2\) .* got \[0, 5\]"):
        mpt_prompts(shared, u, v, torch.tensor([0, 5]))
    with pytest.raises(ComposerError, match="do not fit a shared prompt of shape"):
        mpt_prompts(shared, torch.ones(2, 3, 1), v, torch.tensor([0]))


# -- teachers on the tiny BERT ----------------------------------------------------------------------
def _backbone_name(tiny_bert_dir) -> str:
    return load_backbone(str(tiny_bert_dir)).name


def _save_teacher(name, task, backbone, head, P=4, H=32, seed=0, scale=0.5, family="encoder"):
    g = torch.Generator().manual_seed(seed)
    Library().save(name, torch.randn(P, H, generator=g) * scale,
                   {"task": task, "backbone": backbone, "family": family, "head": head})


@pytest.fixture
def teachers(tiny_bert_dir):
    """A library prompt for each of the two tasks, named like the task (multitask --init library's rule)."""
    bb = _backbone_name(tiny_bert_dir)
    _save_teacher("toy", "toy", bb, "label-similarity", seed=1)
    _save_teacher("toy3", "toy3", bb, "linear", seed=2)
    return bb


def _mean_kl(mp, batch) -> float:
    """Mean KL(teacher || student) of the label distributions over a fixed mixed batch, without dropout."""
    from composer.mpt import _kl_rows

    core = mp.model
    core.eval()
    kls = []
    with torch.no_grad():
        for i, k in enumerate(core.tasks):
            rows = (batch["task_ids"] == i).nonzero(as_tuple=True)[0]
            ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
            kls.append(_kl_rows(core._teachers[k](ids, mask), core.view(k)(ids, mask)))
    return torch.cat(kls).mean().item()


def test_distillation_lowers_the_kl_to_the_teachers(tasks, teachers, tiny_bert_dir, tmp_path):
    cfg = mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", steps=30, eval_every=30, lr=0.05,
               distill_kl=5.0, distill_hidden=1.0)
    mp = M.prepare_multitask(cfg)
    keys = list(mp.model.tasks)
    plan = M.MixturePlan([len(mp.tasks[k].train) for k in keys], 32, 0, 1.0)
    batch = M._batch(mp, keys, plan.indices(0), mp.backbone.tokenizer.pad_token_id)
    before = _mean_kl(mp, batch)
    M.train_multitask(cfg, prepared=mp, progress=False)
    load_trainable(mp.model, load_file(f"{cfg.run_dir}/checkpoint/trainable.safetensors"))  # the last step's
    after = _mean_kl(mp, batch)
    assert after < 0.7 * before, (before, after)
    logged = [json.loads(x) for x in open(f"{cfg.run_dir}/metrics.jsonl") if '"distill"' in x]
    assert logged and {"kl", "mse"} <= set(logged[0]["distill"])
    # the teachers never train, and are in no checkpoint
    ckpt = load_file(f"{cfg.run_dir}/checkpoint/trainable.safetensors")
    assert not any(n.startswith("teacher") for n in ckpt) and {"shared.shared", "shared.u", "shared.v"} <= set(ckpt)
    torch.testing.assert_close(mp.model.teacher_prompts["toy"].weight, Library().load("toy").prompt)


def test_mixed_batch_routes_each_row_to_its_tasks_decomposed_prompt(tasks, teachers, tiny_bert_dir, tmp_path):
    mp = M.prepare_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt"))
    model = mp.model
    with torch.no_grad():
        model.shared.u.normal_(generator=torch.Generator().manual_seed(0))
    model.eval()
    pad = mp.backbone.tokenizer.pad_token_id
    a, b = mp.tasks["toy"].train, mp.tasks["toy3"].train
    layout = [("toy", a, 0), ("toy3", b, 0), ("toy", a, 1), ("toy3", b, 1)]
    ids, mask = pad_batch([enc.ids[i] for _, enc, i in layout], pad)
    task_ids = torch.tensor([model.tasks.index(t) for t, _, _ in layout])
    with torch.no_grad():
        mixed = model(ids, mask, task_ids)  # [B, C]: each row's own task prompt, chosen by the batch's task ids
        for row, (t, enc, i) in enumerate(layout):
            one, m1 = pad_batch([enc.ids[i]], pad)
            alone = model.view(t)(one, m1)[0]
            torch.testing.assert_close(mixed[row, : len(alone)], alone, atol=1e-5, rtol=1e-5)
        k = model.tasks.index("toy3")
        want = model.shared.shared * (model.shared.u[k] @ model.shared.v[k])
        torch.testing.assert_close(model.prompts["toy3"](torch.zeros(1, 2, 32))[0], want)


# -- stage 1 saves, stage 2 starts from it -------------------------------------------------------------
def test_stage_one_saves_the_shared_prompt_with_factors_and_provenance(tasks, teachers, tiny_bert_dir, tmp_path):
    r = M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", save_prefix="m-"), progress=False)
    assert r["shared_saved"] == "m-shared"
    lib = Library()
    e = lib.load("m-shared")
    prov = e.meta["provenance"]
    assert prov["shared"] == "mpt" and prov["tasks"] == ["toy", "toy3"]
    assert prov["teachers"] == {"toy": "toy", "toy3": "toy3"} and prov["weights"] == {"kl": 1.0, "hidden": 1.0}
    f = e.extra("mpt")
    assert e.prompt.shape == (4, 32) and f["u"].shape == (2, 4, 1) and f["v"].shape == (2, 1, 32)
    final = load_file(f"{r['run_dir']}/checkpoint/trainable.safetensors")  # the shared entry is the last state
    torch.testing.assert_close(e.prompt, final["shared.shared"])
    for t in ("toy", "toy3"):  # each task's own, usable entry: its P_k, materialised, a plain prompt
        te = lib.load(f"m-{t}")
        assert te.extra("mpt") is None and te.meta["provenance"]["teacher"] == t
        best = load_file(f"{r['run_dir']}/best/{t}/trainable.safetensors")
        k = ["toy", "toy3"].index(t)
        torch.testing.assert_close(te.prompt, mpt_prompts(best["shared.shared"], best["shared.u"], best["shared.v"],
                                                          torch.tensor([k]))[0])


def test_stage_two_starts_at_the_decomposed_prompt_and_trains_its_parts(tasks, teachers, tiny_bert_dir, tmp_path):
    M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", save_prefix="m-"), progress=False)
    e = Library().load("m-shared")
    u, v = e.extra("mpt")["u"], e.extra("mpt")["v"]
    bb = load_backbone(str(tiny_bert_dir))
    src, prov = init_prompt("library:m-shared@toy3", 4, bb)
    assert torch.equal(src.static(), mpt_prompts(e.prompt, u, v, torch.tensor([1]))[0])  # exactly P_k at step 0
    assert prov == {"init": "library", "from": "m-shared", "shared": "mpt", "factors": "toy3"}
    ones, _ = init_prompt("library:m-shared", 4, bb)
    assert torch.equal(ones.static(), e.prompt)  # factors at one: the target starts at P*
    mean, _ = init_prompt("library:m-shared@mean", 4, bb)
    assert torch.equal(mean.mpt.u[0], u.mean(0))
    # a training run of the target: P*, u and v all move, and the saved prompt is the trained P* ∘ (u vᵀ)
    cfg = TrainConfig(task=tasks[0], backbone=str(tiny_bert_dir), init="library:m-shared@toy", steps=3,
                      batch_size=8, lr=0.1, eval_every=3, max_eval=12, save="target", run_dir=str(tmp_path / "t"))
    r = train(cfg, progress=False)
    first = [json.loads(x) for x in open(f"{r['run_dir']}/metrics.jsonl")][0]
    assert first["step"] == 0 and r["initial"]["score"] == first["eval"]["score"]
    ck = load_file(f"{r['run_dir']}/checkpoint/trainable.safetensors")
    names = {n for n in ck if n.startswith("prompt_source.")}
    assert names == {"prompt_source.mpt.shared", "prompt_source.mpt.u", "prompt_source.mpt.v"}
    assert not torch.equal(ck["prompt_source.mpt.u"][0], u[0]) and not torch.equal(ck["prompt_source.mpt.shared"],
                                                                                    e.prompt)
    saved = Library().load("target")
    assert saved.meta["provenance"]["shared"] == "mpt" and saved.extra("mpt") is None and saved.prompt.shape == (4, 32)


def test_stage_two_similar_follows_the_graphs_edge(tasks, teachers, tiny_bert_dir, tmp_path):
    graph = tmp_path / "g.yaml"
    graph.write_text(f"""name: g
nodes:
  - {{name: toy, role: source, task: {tasks[0]}, prompt: toy}}
  - {{name: toy3, role: source, task: {tasks[1]}, prompt: toy3}}
  - {{name: tgt, role: target, task: {tasks[0]}}}
similar:
  - {{source: toy3, target: tgt, weight: 0.9, metric: cos-avg}}
  - {{source: toy, target: tgt, weight: 0.2, metric: cos-avg}}
""")
    r = M.train_multitask(mcfg(None, tiny_bert_dir, tmp_path, graph=str(graph), shared="mpt", save_prefix="g-"),
                          progress=False)
    assert r["tasks"] == ["toy", "toy3"]  # MPT trains the graph's sources, never its target
    src, prov = init_prompt("library:g-shared@similar", 4, load_backbone(str(tiny_bert_dir)),
                            spec=type("S", (), {"name": "tgt"})())
    assert prov["factors"] == "toy3"


def test_prefix_kind_trains_and_reloads(tasks, teachers, tiny_bert_dir, tmp_path):
    r = M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", kind="prefix", steps=3,
                               save_prefix="p-"), progress=False)
    e = Library().load("p-shared")
    assert e.meta["kind"] == "prefix" and e.prompt.shape == (2, 2, 4, 32)  # the teachers' induced prefixes' mean
    assert e.extra("mpt")["u"].shape == (2, 16, 1)
    assert Library().load("p-toy").meta["kind"] == "prefix" and r["per_task"]["toy"]["saved"] == "p-toy"
    src, _ = init_prompt("library:p-shared@toy", 4, load_backbone(str(tiny_bert_dir)), kind="prefix")
    assert src.kind == "prefix"
    with pytest.raises(ComposerError, match="is an MPT prefix, and this run trains a prompt: train it with --kind prefix"):
        init_prompt("library:p-shared", 4, load_backbone(str(tiny_bert_dir)))


def test_generation_of_a_mixed_batch_needs_no_task_ids_by_hand(tmp_path, monkeypatch, tiny_llama_dir, toy_task):
    from tests.test_generation import write_copy_task

    copy = write_copy_task(tmp_path)
    bb = load_backbone(str(tiny_llama_dir))
    for name, task, seed in (("copy", "copy", 1), ("toy", "toy", 2)):
        _save_teacher(name, task, bb.name, None, P=3, seed=seed, scale=0.05, family="decoder")
    cfg = MultiTaskConfig(tasks=[str(copy), str(toy_task)], backbone=str(tiny_llama_dir), shared="mpt", steps=2,
                          batch_size=8, eval_every=2, max_eval=4, max_test=4, run_dir=str(tmp_path / "mt"))
    r = M.train_multitask(cfg, progress=False)  # generation rows distil each target token's distribution
    assert r["per_task"]["copy"]["metric"] == "exact_match"
    mp = M.prepare_multitask(cfg)
    model = mp.model.eval()
    with torch.no_grad():
        model.shared.u.normal_(generator=torch.Generator().manual_seed(0))
    pad = bb.tokenizer.pad_token_id
    c, t = mp.tasks["copy"].dev, mp.tasks["toy"].dev
    rows = [("copy", c.ids[0]), ("toy", t.ids[0]), ("copy", c.ids[1])]
    ids, mask = pad_batch([r for _, r in rows], pad)
    task_ids = torch.tensor([model.tasks.index(k) for k, _ in rows])  # what a mixed batch carries
    out = generate_mixed(model, ids, mask, task_ids, pad_id=pad, max_new_tokens=3)
    for j, (k, r) in enumerate(rows):  # each row decoded with its own task's P_k
        alone = model.view(k).generate(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), max_new_tokens=3)
        assert torch.equal(out[j, : alone.shape[1]], alone[0])
    assert not torch.equal(model.prompts["copy"](ids)[0], model.prompts["toy"](ids)[0])


# -- bad input: one line, nothing lost -------------------------------------------------------------
def _library_state():
    lib = Library()
    return {n: lib.content_sha(n) for n in lib.names()}


def test_teachers_of_different_lengths_are_refused(tasks, tiny_bert_dir, tmp_path):
    bb = _backbone_name(tiny_bert_dir)
    _save_teacher("toy", "toy", bb, "label-similarity", P=4)
    _save_teacher("toy3", "toy3", bb, "linear", P=6)
    before = _library_state()
    with pytest.raises(TrainingError) as e:
        M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", save_prefix="m-"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "teachers differ in shape ('toy' [4, 32], 4 tokens; 'toy3' [6, 32], 6 tokens)" in msg
    assert _library_state() == before


def test_teachers_of_different_backbones_are_refused(tasks, tiny_bert_dir, tmp_path):
    bb = _backbone_name(tiny_bert_dir)
    _save_teacher("toy", "toy", bb, "label-similarity")
    _save_teacher("toy3", "toy3", "minilm", "linear")  # same hidden size and family, another backbone
    before = _library_state()
    with pytest.raises(TrainingError, match=r"teachers come from different backbones \('toy' on .*, 'toy3' on "
                                            r"'minilm'\); one shared prompt needs teachers trained on one backbone"):
        M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", save_prefix="m-"), progress=False)
    assert _library_state() == before


def test_a_task_without_a_teacher_is_refused(tasks, tiny_bert_dir, tmp_path):
    _save_teacher("toy", "toy", _backbone_name(tiny_bert_dir), "label-similarity")
    with pytest.raises(TrainingError, match="--shared mpt distils each task's own prompt, and task 'toy3' has none"):
        M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt"), progress=False)


def test_a_task_not_in_the_shared_entry_is_refused(tasks, teachers, tiny_bert_dir, tmp_path):
    M.train_multitask(mcfg(tasks, tiny_bert_dir, tmp_path, shared="mpt", save_prefix="m-"), progress=False)
    before = _library_state()
    bb = load_backbone(str(tiny_bert_dir))
    with pytest.raises(ComposerError, match=r"^--init library:m-shared@nope: task 'nope' is not in that shared "
                                            r"prompt \(it holds toy, toy3\); pick one of them, @mean, @similar"):
        init_prompt("library:m-shared@nope", 4, bb)
    with pytest.raises(ComposerError, match="'@TASK' picks a task's factors of a shared .MPT. prompt, and 'toy' is "
                                            "a plain prompt"):
        init_prompt("library:toy@toy", 4, bb)
    with pytest.raises(ComposerError, match="was trained from a task list, not a graph"):
        init_prompt("library:m-shared@similar", 4, bb)
    assert _library_state() == before


@pytest.mark.parametrize("kw,msg", [
    ({"shared": "soup"}, "unknown --shared 'soup': use one of none, mpt"),
    ({"shared": "mpt", "composer": "attention"}, "--shared mpt with --composer attention"),
    ({"shared": "mpt", "init": "library"}, "--init library does not apply with --shared mpt"),
    ({"shared": "mpt", "distill_kl": -1.0}, "distill_kl must be a finite number >= 0"),
    ({"shared": "mpt", "distill_hidden": float("nan")}, "distill_hidden must be a finite number >= 0"),
])
def test_bad_mpt_config(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        MultiTaskConfig(tasks="a,b", **kw)


def test_cli_runs_both_stages(tasks, teachers, tiny_bert_dir, tmp_path):
    from click.testing import CliRunner

    import cli

    run = CliRunner().invoke(cli.cli, ["train", "--multitask", "--tasks", ",".join(tasks), "--shared", "mpt",
                                       "--model", str(tiny_bert_dir), "--steps", "2", "--batch-size", "8",
                                       "--eval-every", "2", "--max-eval", "8", "--save-prefix", "c-",
                                       "--run-dir", str(tmp_path / "r1"), "--quiet", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["shared_saved"] == "c-shared"
    run = CliRunner().invoke(cli.cli, ["train", tasks[0], "--init", "library:c-shared@toy", "--model",
                                       str(tiny_bert_dir), "--steps", "2", "--batch-size", "8", "--eval-every", "2",
                                       "--max-eval", "8", "--run-dir", str(tmp_path / "r2"), "--quiet", "--json"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(cli.cli, ["train", tasks[0], "--init", "library:c-shared@nope", "--model",
                                       str(tiny_bert_dir), "--steps", "2", "--run-dir", str(tmp_path / "r3")])
    assert run.exit_code == 1 and "task 'nope' is not in that shared prompt" in run.output
    assert len(run.output.strip().splitlines()) == 1
