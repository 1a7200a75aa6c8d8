"""The training loop on a tiny BERT: determinism, resume equality, NaN stop, joint mode, saving."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import composer.runstate as R
import composer.train as T
from composer.errors import TrainingError
from composer.library import Library
from composer.train import TrainConfig, train
from tests.conftest import ctrl_c_at_step


def cfg(toy_task, tiny_bert_dir, tmp_path, **kw):
    base = dict(task=str(toy_task), backbone=str(tiny_bert_dir), prompt_length=4, steps=12, batch_size=8, lr=0.1,
                eval_every=4, max_eval=40, seed=0, run_dir=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def final_prompt(run_dir) -> torch.Tensor:
    return load_file(f"{run_dir}/checkpoint/trainable.safetensors")["prompt_source.weight"]


def test_same_seed_same_numbers(toy_task, tiny_bert_dir, tmp_path):
    a = train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "a")), progress=False)
    b = train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "b")), progress=False)
    assert torch.equal(final_prompt(tmp_path / "a"), final_prompt(tmp_path / "b"))
    assert a["dev"] == b["dev"]
    c = train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "c"), seed=1), progress=False)
    assert not torch.equal(final_prompt(tmp_path / "a"), final_prompt(tmp_path / "c"))
    assert c["steps"] == 12
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" in r] == [0, 4, 8, 12]
    assert any("loss" in r for r in lines)


def test_interrupt_then_resume_equals_uninterrupted(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "full")), progress=False)
    restore = ctrl_c_at_step(monkeypatch, T, 7)
    c = cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "cut"))
    with pytest.raises(TrainingError, match=r"interrupted at step 7; continue with --resume .*cut"):
        train(c, progress=False)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 7
    restore()
    r = train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=None), resume=tmp_path / "cut", progress=False)
    assert r["steps"] == 12
    torch.testing.assert_close(final_prompt(tmp_path / "cut"), final_prompt(tmp_path / "full"), rtol=0, atol=1e-6)


def test_resume_refuses_another_task(toy_task, tiny_bert_dir, tmp_path):
    train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2), progress=False)
    other = cfg(toy_task, tiny_bert_dir, tmp_path, backbone="minilm")
    with pytest.raises(TrainingError, match="that run has model .* this one 'minilm'"):
        train(other, resume=tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="that run has mode 'prompt', this one 'joint'"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, mode="joint"), resume=tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="that run has task .* this one 'polarity'"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, task="polarity"), resume=tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="no config.json there"):
        train(other, resume=tmp_path / "nowhere", progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    real = T.F.cross_entropy
    n = {"i": 0}

    def ce(*a, **k):  # the training loss (grad enabled) turns NaN from the 7th step on
        n["i"] += a[0].requires_grad
        loss = real(*a, **k)
        return loss * float("nan") if n["i"] > 6 else loss

    monkeypatch.setattr(T.F, "cross_entropy", ce)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6; the last good checkpoint"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, checkpoint_every=2), progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    assert torch.isfinite(final_prompt(tmp_path / "run")).all()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    import errno

    real = R.save_file
    calls = {"ckpt": 0}

    def fill_disk(tensors, path):  # the 3rd checkpoint finds the disk full halfway through its first file
        if ".checkpoint." in path:
            calls["ckpt"] += 1
            if calls["ckpt"] == 3:
                with open(path, "wb") as f:
                    f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(R, "save_file", fill_disk)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(cfg(toy_task, tiny_bert_dir, tmp_path, checkpoint_every=2), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "previous one there is intact" in msg
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # checkpoints at steps 2 and 4 landed; the one at step 6 did not
    assert torch.isfinite(final_prompt(run)).all()
    assert not list(run.glob(".*tmp")) and not list(run.glob(".*old"))  # no half-written folder left behind

    monkeypatch.setattr(R, "save_file", real)  # space again: the run continues from step 4 to the end
    r = train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=None), resume=run, progress=False)
    assert r["steps"] == 12
    train(cfg(toy_task, tiny_bert_dir, tmp_path, run_dir=str(tmp_path / "whole"), checkpoint_every=2),
          progress=False)
    torch.testing.assert_close(final_prompt(run), final_prompt(tmp_path / "whole"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw,msg", [
    ({"steps": 0}, "--steps must be positive, got 0"),
    ({"lr": -1.0}, "prompt learning rate must be > 0, got -1.0"),
    ({"mode": "joint", "model_lr": 0.0}, "--model-lr is 0.0 but --unfreeze all trains the backbone"),
    ({"unfreeze": "last:x"}, "bad --unfreeze 'last:x'"),
    ({"mode": "sideways"}, "unknown --mode 'sideways'"),
    ({"warmup": 1.5}, "--warmup is a fraction"),
    ({"backbone": None}, "needs a backbone: give --model"),
    ({"mixed_precision": "fp8"}, "unknown --mixed-precision 'fp8'"),
    ({"patience": -1}, "--patience must be >= 0"),
])
def test_bad_config(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        TrainConfig(task="x", **kw)


def test_unfreeze_beyond_depth(toy_task, tiny_bert_dir, tmp_path):
    with pytest.raises(TrainingError, match="--unfreeze last:5 but the backbone has only 2 layers"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, mode="joint", unfreeze="last:5"), progress=False)


@pytest.mark.parametrize("unfreeze", ["bias", "last:1", "none"])
def test_joint_mode_changes_exactly_the_chosen_weights(toy_task, tiny_bert_dir, tmp_path, unfreeze):
    from transformers import AutoModel

    before = {n: p.clone() for n, p in AutoModel.from_pretrained(tiny_bert_dir).named_parameters()}
    train(cfg(toy_task, tiny_bert_dir, tmp_path, mode="joint", unfreeze=unfreeze, steps=3, eval_every=3,
              model_lr=1e-2, save="j"), progress=False)
    last = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))  # the weights after step 3
    keep = T.backbone_filter(unfreeze, 2)
    expected = {n for n in before if keep(n)}
    assert set(last) == {"prompt_source.weight"} | {f"network.{n}" for n in expected}
    changed = {n for n in expected if not torch.equal(before[n], last[f"network.{n}"])}
    if unfreeze == "none":
        assert not expected
    else:  # the optimizer touched (nearly) every chosen tensor; pooler weights get no gradient
        assert len(changed) >= 0.8 * len([n for n in expected if "pooler" not in n])
    entry = Library().load("j")
    assert set(entry.extra("backbone") or {}) == expected


def test_save_and_reload_linear_head(toy_task, tiny_bert_dir, tmp_path):
    from composer.backbones import load_backbone
    from composer.encoding import encode_split
    from composer.model import from_library
    from composer.evaluate import predict
    from composer.taskdata import load_splits
    from composer.tasks import load_task

    r = train(cfg(toy_task, tiny_bert_dir, tmp_path, head="linear", save="lin"), progress=False)
    e = Library().load("lin")
    assert e.meta["head"] == "linear" and set(e.extra("head")) == {"proj.weight", "proj.bias"}
    assert e.meta["provenance"]["init"] == "random" and e.meta["task"] == "toy"
    spec = load_task(str(toy_task))
    pm = from_library(e, load_backbone(str(tiny_bert_dir)), spec)
    enc = encode_split(spec, load_splits(spec, splits=["dev"])["dev"], pm.backbone.tokenizer)
    from composer.evaluate import score

    assert score(spec, predict(pm, enc), enc)["score"] == pytest.approx(r["dev"]["score"])


def test_batch_plan_is_a_function_of_the_step():
    a, b = R.BatchPlan(10, 4, seed=3), R.BatchPlan(10, 4, seed=3)
    seq = [a.indices(s) for s in range(6)]
    assert [b.indices(s) for s in (5, 0, 3)] == [seq[5], seq[0], seq[3]]
    flat = sum(seq[:5], [])  # 20 positions = two epochs, each a permutation of 0..9
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert R.shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_gradient_checkpointing_run_matches(toy_task, tiny_bert_dir, tmp_path):
    a = train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=4, eval_every=4, run_dir=str(tmp_path / "a")), progress=False)
    b = train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=4, eval_every=4, run_dir=str(tmp_path / "b"),
                  gradient_checkpointing=True), progress=False)
    torch.testing.assert_close(final_prompt(tmp_path / "a"), final_prompt(tmp_path / "b"), atol=1e-5, rtol=1e-4)
    assert a["steps"] == b["steps"] == 4


def test_config_reads_back_what_older_runs_wrote(tmp_path):
    """config.json of a single-task run from before label_temperature had its name still resumes."""
    d = TrainConfig(task="x", label_temperature=0.2).to_dict()
    assert TrainConfig.from_dict(d) == TrainConfig(task="x", label_temperature=0.2)
    old = {k: v for k, v in d.items() if k != "label_temperature"} | {"temperature": 0.1}
    assert TrainConfig.from_dict(old).label_temperature == 0.1
    with pytest.raises(TrainingError, match="unknown setting.*frobnicate"):
        TrainConfig.from_dict(d | {"frobnicate": 1})
    with pytest.raises(TrainingError, match="--label-temperature must be > 0"):
        TrainConfig(task="x", label_temperature=0.0)


def test_prompt_loads_with_the_label_temperature_it_was_trained_with():
    from composer.model import trained_label_temperature

    assert trained_label_temperature({"config": {"task": "x", "label_temperature": 0.2}}) == 0.2
    assert trained_label_temperature({"config": {"task": "x", "temperature": 0.1}}) == 0.1  # older single-task
    # a multitask run's config: temperature is the task-sampling one
    assert trained_label_temperature({"config": {"tasks": ["a"], "temperature": 2.0}}) == 0.05
    assert trained_label_temperature({"config": {"tasks": ["a"], "temperature": 2.0, "label_temperature": 0.3}}) == 0.3
    assert trained_label_temperature({}) == 0.05


def test_eval_scores_with_the_trained_label_temperature(toy_task, tiny_bert_dir, tmp_path):
    from composer.backbones import load_backbone
    from composer.model import from_library
    from composer.tasks import load_task

    train(cfg(toy_task, tiny_bert_dir, tmp_path, head="label-similarity", label_temperature=0.5, steps=2,
              eval_every=2, save="hot"), progress=False)
    e = Library().load("hot")
    pm = from_library(e, load_backbone(str(tiny_bert_dir)), load_task(str(toy_task)))
    assert pm.head.kind == "label-similarity" and pm.head.temperature == 0.5


def test_read_curves_single_multitask_resumed_and_torn(tmp_path):
    from composer.runstate import read_curves

    run = tmp_path / "one"
    run.mkdir()
    lines = [{"step": 0, "eval": {"score": 0.5}}, {"step": 5, "loss": 0.7}, {"step": 10, "eval": {"score": 0.6}},
             {"step": 10, "eval": {"score": 0.65}}, {"step": 20, "eval": {"score": 0.7}}]  # 10 again: resumed
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 30, "ev')
    assert read_curves(run, "toy") == {"toy": ([0, 10, 20], [0.5, 0.65, 0.7])}
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval": {"a": {"score": 0.1}, "b": {"score": 0.2}},
                                                     "mean": 0.15}) + "\n")
    assert read_curves(multi) == {"a": ([0], [0.1]), "b": ([0], [0.2])}
    with pytest.raises(TrainingError, match="no metrics.jsonl there"):
        read_curves(tmp_path / "nowhere")


def test_a_run_follows_another_with_a_different_precision(toy_task, tiny_bert_dir, tmp_path):
    """accelerate keeps one state per process and refuses a second precision; train() in a single process
    drops the earlier state (a notebook that tried bf16 first, a benchmark that times fp32 then bf16)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # whatever an earlier test left
    Accelerator(cpu=True, mixed_precision="bf16")  # what an earlier bf16 run leaves behind
    try:
        r = train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2), progress=False)
        assert r["steps"] == 2
        assert AcceleratorState().mixed_precision == "no"  # this machine has no GPU, or "no" was asked for
    finally:
        AcceleratorState._reset_state()


def test_max_test_caps_the_final_evaluation(toy_task, tiny_bert_dir, tmp_path):
    """--max-test evaluates a seeded subset of the dev and test splits at the end; without it, the whole splits."""
    whole = train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2, run_dir=str(tmp_path / "w")),
                  progress=False)
    capped = train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2, max_test=10,
                       run_dir=str(tmp_path / "c")), progress=False)
    assert whole["dev"]["n"] > 10 and whole["test"]["n"] > 10
    assert capped["dev"]["n"] == 10 and capped["test"]["n"] == 10
    with pytest.raises(TrainingError, match=r"--max-test must be positive.*got 0"):
        cfg(toy_task, tiny_bert_dir, tmp_path, max_test=0)


def test_prompt_position_is_trained_and_recorded(toy_task, tiny_bert_dir, tmp_path):
    """--prompt-position front trains the prompt before [CLS] (PEFT's placement) and the entry says so."""
    from composer.train import prepare

    c = cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2, prompt_position="front", save="front")
    assert not prepare(c).model.after_first
    train(c, progress=False)
    assert Library().meta("front")["position"] == "front"
    train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=2, eval_every=2, save="cls", run_dir=str(tmp_path / "r2")),
          progress=False)
    assert Library().meta("cls")["position"] == "after-cls"
    with pytest.raises(TrainingError, match="unknown --prompt-position 'middle'"):
        cfg(toy_task, tiny_bert_dir, tmp_path, prompt_position="middle")
