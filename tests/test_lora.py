"""Joint prompt + LoRA (--adapter lora): PEFT's LoRA layers train beside the prompt, are saved with it, load back
for eval, and export as a PEFT LoRA adapter that PeftModel loads to the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import composer.train as T
from composer.backbones import load_backbone
from composer.encoding import encode_split
from composer.errors import TrainingError
from composer.evaluate import predict
from composer.library import Library
from composer.lora import is_lora_param, peft_key
from composer.model import build_model, from_library
from composer.peft_io import export_peft
from composer.taskdata import load_splits
from composer.tasks import load_task
from composer.train import TrainConfig, train
from tests.conftest import ctrl_c_at_step


def cfg(task, backbone_dir, tmp_path, **kw):
    base = dict(task=str(task), backbone=str(backbone_dir), prompt_length=4, steps=4, batch_size=8, lr=0.1,
                eval_every=2, max_eval=40, seed=0, run_dir=str(tmp_path / "run"), mode="joint", adapter="lora",
                lora_r=4, lora_lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def dev_logits(pm, task):
    spec = load_task(str(task))
    enc = encode_split(spec, load_splits(spec, splits=["dev"])["dev"], pm.backbone.tokenizer)
    with torch.no_grad():
        return predict(pm, enc.subset(16, 0))


@pytest.mark.parametrize("backbone", ["tiny_bert_dir", "tiny_llama_dir"])
def test_only_the_prompt_and_the_lora_train_and_the_entry_loads_back_to_the_same_logits(
        toy_task, tmp_path, request, backbone):
    from transformers import AutoModel, AutoModelForCausalLM

    path = request.getfixturevalue(backbone)
    auto = AutoModel if backbone == "tiny_bert_dir" else AutoModelForCausalLM
    before = dict(auto.from_pretrained(path).named_parameters())
    train(cfg(toy_task, path, tmp_path, save="j"), progress=False)
    last = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    lora = {n for n in last if is_lora_param(n)}
    assert set(last) == {"prompt_source.weight"} | lora and lora
    assert any(not torch.equal(t, torch.zeros_like(t)) for n, t in last.items() if "lora_B" in n)  # B starts at 0

    entry = Library().load("j")
    targets = {"tiny_bert_dir": ["query", "value"], "tiny_llama_dir": ["q_proj", "v_proj"]}[backbone]
    assert entry.meta["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": targets}
    assert "backbone" not in entry.meta["extras"]  # no backbone weight changed, so none is saved
    best = load_file(str(tmp_path / "run" / "best" / "trainable.safetensors"))
    assert {f"network.{n}": t for n, t in entry.extra("lora").items()}.keys() == lora
    assert all(torch.equal(t, best[f"network.{n}"]) for n, t in entry.extra("lora").items())  # the kept checkpoint

    # a tiny model's best dev checkpoint may be the init (B = 0): give the entry's LoRA weights that change it
    g = torch.Generator().manual_seed(0)
    Library().save("k", entry.prompt, dict(entry.meta),
                   extras={"lora": {n: torch.randn(t.shape, generator=g) * 0.1 for n, t in entry.extra("lora").items()}})
    entry = Library().load("k")
    pm = from_library(entry, load_backbone(str(path)), load_task(str(toy_task)))
    assert not any(p.requires_grad for n, p in pm.network.named_parameters() if is_lora_param(n))
    assert all(torch.equal(p, entry.extra("lora")[n]) for n, p in pm.network.named_parameters() if is_lora_param(n))
    base = {n.replace(".base_layer", ""): p for n, p in pm.network.named_parameters() if not is_lora_param(n)}
    assert all(torch.equal(base[n], p) for n, p in before.items())  # the frozen weights are the checkpoint's
    plain = build_model(load_backbone(str(path)), load_task(str(toy_task)), entry.prompt)
    ours = dev_logits(pm, toy_task)
    assert (ours - dev_logits(plain, toy_task)).abs().max() > 1e-3  # the LoRA is part of the model

    # the export: the prompt adapter + lora/, a PEFT LoRA adapter; PeftModel merges it into a fresh backbone
    from peft import PeftModel

    out = export_peft(Library(), "k", tmp_path / "export")
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == targets
    bb = load_backbone(str(path))
    bb.network = PeftModel.from_pretrained(bb.network, out / "lora").merge_and_unload()
    theirs = dev_logits(build_model(bb, load_task(str(toy_task)), entry.prompt), toy_task)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert export_peft(Library(), "k", out, overwrite=True) == out  # --force replaces a previous export, lora/ too
    # an entry whose LoRA names weights this backbone does not have: one line, from the library
    from composer.errors import LibraryError

    bad = {**entry.extra("lora"), "no.such.lora_A.weight": torch.zeros(4, 4)}
    Library().save("bad", entry.prompt, dict(entry.meta), extras={"lora": bad})
    with pytest.raises(LibraryError, match=r"holds LoRA weights 'no.such.lora_A.weight' that this backbone lacks"):
        from_library(Library().load("bad"), load_backbone(str(path)), load_task(str(toy_task)))


def test_peft_key_drops_the_adapter_name_as_peft_saves():
    assert peft_key("encoder.layer.0.attention.self.query.lora_A.default.weight") == \
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"


def test_interrupt_then_resume_equals_uninterrupted(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=6, run_dir=str(tmp_path / "full")), progress=False)
    restore = ctrl_c_at_step(monkeypatch, T, 3)
    with pytest.raises(TrainingError, match="interrupted at step 3"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=6, run_dir=str(tmp_path / "cut")), progress=False)
    restore()
    train(cfg(toy_task, tiny_bert_dir, tmp_path, steps=6, run_dir=None), resume=tmp_path / "cut", progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw,msg", [
    (dict(mode="prompt"), "--adapter lora trains beside the prompt in joint mode: add --mode joint"),
    (dict(unfreeze="last:1"), "drop --unfreeze last:1"),
    (dict(lora_r=0), "--lora-r and --lora-alpha must be positive"),
    (dict(lora_dropout=1.0), r"--lora-dropout is a probability in \[0, 1\)"),
    (dict(lora_lr=float("inf")), "--lora-lr must be a finite number"),
    (dict(adapter="ia3"), "unknown --adapter 'ia3'"),
])
def test_bad_lora_settings_are_refused_in_one_line(kw, msg):
    with pytest.raises(TrainingError, match=msg):
        TrainConfig(**(dict(task="x", mode="joint", adapter="lora") | kw))


def test_unknown_target_modules_are_named(toy_task, tiny_bert_dir, tmp_path):
    with pytest.raises(TrainingError, match="--lora-targets nope"):
        train(cfg(toy_task, tiny_bert_dir, tmp_path, lora_targets="nope"), progress=False)


def test_multitask_lora_one_adapter_shared_by_every_task_saved_with_each(toy_task, tiny_bert_dir, tmp_path):
    """--multitask --mode joint --adapter lora: one LoRA on the shared backbone trains with every task's prompt;
    each task's entry holds it (the same tensors), loads back to the run's own dev score, and the frozen weights
    never move."""
    from transformers import AutoModel

    from composer.config import MultiTaskConfig
    from composer.evaluate import evaluate
    from composer.multitask import train_multitask
    from tests.conftest import write_toy_task

    other = write_toy_task(tmp_path, name="toy2", seed=1)
    before = dict(AutoModel.from_pretrained(tiny_bert_dir).named_parameters())
    mc = MultiTaskConfig(tasks=[str(toy_task), str(other)], backbone=str(tiny_bert_dir), prompt_length=4, steps=6,
                         batch_size=8, lr=0.1, eval_every=3, max_eval=16, seed=0, run_dir=str(tmp_path / "mt"),
                         mode="joint", adapter="lora", lora_r=4, lora_lr=5e-2, save_prefix="mt-")
    res = train_multitask(mc, progress=False)
    last = load_file(str(tmp_path / "mt" / "checkpoint" / "trainable.safetensors"))
    lora = {n for n in last if is_lora_param(n)}
    assert lora and set(last) == {"prompts.toy.weight", "prompts.toy2.weight"} | lora  # no backbone weight
    assert any(not torch.equal(last[n], torch.zeros_like(last[n])) for n in lora if "lora_B" in n)
    for key in ("toy", "toy2"):
        entry = Library().load(f"mt-{key}")
        assert entry.meta["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["query", "value"]}
        best = load_file(str(tmp_path / "mt" / "best" / key / "trainable.safetensors"))
        assert all(torch.equal(t, best[f"network.{n}"]) for n, t in entry.extra("lora").items())  # its best
        spec = load_task(str(toy_task if key == "toy" else other))
        pm = from_library(entry, load_backbone(str(tiny_bert_dir)), spec)
        base = {n.replace(".base_layer", ""): p for n, p in pm.network.named_parameters() if not is_lora_param(n)}
        assert all(torch.equal(base[n], p) for n, p in before.items())
        dev = encode_split(spec, load_splits(spec, splits=["dev"])["dev"], pm.backbone.tokenizer)
        assert evaluate(pm, spec, dev, 64, torch.device("cpu"))["score"] == pytest.approx(
            res["per_task"][key]["dev"]["score"])


def test_multitask_lora_with_mpt_is_refused():
    from composer.config import MultiTaskConfig

    with pytest.raises(TrainingError, match="--shared mpt with --adapter lora"):
        MultiTaskConfig(tasks=["a", "b"], mode="joint", adapter="lora", shared="mpt")
