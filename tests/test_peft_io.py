"""PEFT interop: a library prompt exported as a prompt-tuning adapter loads with PeftModel.from_pretrained
and gives our logits; adapters import back; wrong adapters and outputs get one-line errors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is an optional extra: pip install prompt-composer[peft]")

from composer.backbones import wrap  # noqa: E402
from composer.model import build_model  # noqa: E402
from composer.errors import LibraryError  # noqa: E402
from composer.library import Library  # noqa: E402
from composer.peft_io import export_peft, import_peft  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

P = 5
SPEC = SimpleNamespace(name="toy", label_words=[" bad", " good"], labels=["0", "1"], head=None)


@pytest.fixture
def lib(tmp_path):
    return Library(tmp_path / "lib")


def _save_model(family: str, path):
    tiny_model(family).save_pretrained(path)
    return path


def _batch(tokenizer, texts):
    from composer.encoding import pad_batch

    seqs = [tokenizer(t)["input_ids"] for t in texts]
    return pad_batch(seqs, tokenizer.pad_token_id)  # right-padded, like our training batches


def _prompt(seed: int = 1) -> torch.Tensor:
    return torch.randn(P, 32, generator=torch.Generator().manual_seed(seed)) * 0.5  # [P, H]


@pytest.mark.parametrize("texts", [["the film was good"], ["the film was good", "bad", "a long dull song it was"]])
def test_decoder_export_loads_in_peft_with_identical_logits(tmp_path, tokenizer, lib, texts):
    from transformers import AutoModelForCausalLM

    model_dir = _save_model("decoder", tmp_path / "base")
    prompt = _prompt()
    lib.save("p", prompt, {"backbone": str(model_dir), "family": "decoder", "task": "toy", "head": "verbalizer"})
    out = export_peft(lib, "p", tmp_path / "adapter")

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_transformer_submodules"]) == (P, 32, 1)
    assert cfg["base_model_name_or_path"] == str(model_dir.resolve()) and cfg["num_layers"] == 2

    pmodel = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    ids, mask = _batch(tokenizer, texts)
    bb = wrap(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, name=str(model_dir), family="decoder")
    pm = build_model(bb, SPEC, lib.load("p").prompt)
    with torch.no_grad():
        theirs = pmodel(input_ids=ids, attention_mask=mask).logits  # [B, P+T, V]
        embeds, full_mask, _, _ = pm.prompted(ids, mask)
        ours = pm.network(inputs_embeds=embeds, attention_mask=full_mask).logits  # [B, P+T, V]
        scores = pm(ids, mask)  # [B, C] verbalizer: log p(label word | prompt, input)
    real = full_mask.bool()
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)
    # the next-token logits after each row's last real token, scored as our head scores them
    last = full_mask.sum(1) - 1
    logp = torch.log_softmax(theirs[torch.arange(len(ids)), last], -1)
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in SPEC.label_words]
    torch.testing.assert_close(logp[:, label_ids], scores, atol=1e-5, rtol=0)


def test_encoder_decoder_export_is_encoder_side_only(tmp_path, tokenizer, lib):
    from transformers import AutoModelForSeq2SeqLM

    model_dir = _save_model("encoder-decoder", tmp_path / "base")
    lib.save("p", _prompt(2), {"backbone": str(model_dir), "family": "encoder-decoder"})
    out = export_peft(lib, "p", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 1

    pmodel = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), out).eval()
    bb = wrap(AutoModelForSeq2SeqLM.from_pretrained(model_dir), tokenizer, name=str(model_dir),
              family="encoder-decoder")
    pm = build_model(bb, SPEC, lib.load("p").prompt)
    ids, mask = _batch(tokenizer, ["the film was good", "bad"])
    dec = torch.tensor([[0, 7592, 2088], [0, 2204, 102]])  # decoder_start, then two tokens
    with torch.no_grad():
        theirs = pmodel(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits  # [B, 3, V]
        embeds, full_mask, _, _ = pm.prompted(ids, mask)
        ours = pm.network(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_encoder_export_puts_prompt_before_cls(tmp_path, tokenizer, lib):
    """PEFT prepends before [CLS]; we insert after it. The adapter loads; positions differ as documented."""
    from transformers import AutoModel

    model_dir = _save_model("encoder", tmp_path / "base")
    prompt = _prompt(3)
    lib.save("p", prompt, {"backbone": str(model_dir), "family": "encoder"})
    out = export_peft(lib, "p", tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"

    pmodel = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), out).eval()
    base = AutoModel.from_pretrained(model_dir).eval()
    ids, mask = _batch(tokenizer, ["the film was good"])
    with torch.no_grad():
        theirs = pmodel(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds = torch.cat([prompt[None], base.get_input_embeddings()(ids)], 1)  # prompt [CLS] rest
        ref = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])).last_hidden_state
    torch.testing.assert_close(theirs, ref, atol=1e-5, rtol=0)


def test_round_trip_keeps_tensor_and_meta(tmp_path, lib):
    prompt = _prompt(4)
    lib.save("src", prompt, {"backbone": "minilm", "family": "encoder", "task": "toy", "head": "label-similarity",
                             "metrics": {"dev": 0.75}, "provenance": {"init": "random"}})
    out = export_peft(lib, "src", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # alias -> upstream id

    entry = import_peft(lib, out, "back")
    assert torch.equal(entry.prompt, lib.load("src").prompt)
    src = lib.load("src").meta
    for key in ("task", "backbone", "family", "head", "hidden_size", "length", "metrics"):
        assert entry.meta[key] == src[key], key
    prov = entry.meta["provenance"]
    assert prov["imported_from"] == str(out) and prov["peft_type"] == "PROMPT_TUNING"
    assert prov["exported_from"]["name"] == "src"

    # a bare adapter (no sidecar): the backbone is its base model, task and head are unknown unless given
    (out / "prompt-composer.json").unlink()
    bare = import_peft(lib, out, "bare", task="toy")
    assert bare.meta["backbone"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (bare.meta["task"], bare.meta["head"], bare.meta["family"]) == ("toy", None, "encoder")
    assert torch.equal(bare.prompt, prompt)
    assert import_peft(lib, out, "named", backbone_name="minilm").meta["backbone"] == "minilm"


def test_import_real_seq2seq_adapter_keeps_encoder_side(tmp_path, lib):
    model = peft.get_peft_model(tiny_model("encoder-decoder"),
                                peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    model.save_pretrained(tmp_path / "adapter")  # PEFT's default: 2 submodules, [2 * P, H]
    table = model.prompt_encoder["default"].embedding.weight.detach()
    assert table.shape == (2 * P, 32)

    entry = import_peft(lib, tmp_path / "adapter", "t5p", backbone_name="tiny-t5")
    assert torch.equal(entry.prompt, table[:P])
    assert entry.meta["family"] == "encoder-decoder" and entry.meta["head"] is None and entry.meta["task"] is None
    assert entry.meta["provenance"]["num_transformer_submodules"] == 2
    assert "kept the first 5 rows, the encoder side" in entry.meta["provenance"]["note"]


def test_import_refuses_lora(tmp_path, lib):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(tiny_model("decoder"), cfg).save_pretrained(tmp_path / "lora")
    with pytest.raises(LibraryError, match=r"is a LORA adapter; only PROMPT_TUNING \(soft prompt\) and PREFIX_TUNING adapters") as e:
        import_peft(lib, tmp_path / "lora", "x")
    assert "\n" not in str(e.value)
    assert not lib.exists("x")


def test_import_missing_config_or_weights(tmp_path, lib):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LibraryError, match=r"no adapter_config.json in .*empty: not a PEFT adapter folder"):
        import_peft(lib, tmp_path / "empty", "x")
    with pytest.raises(LibraryError, match="does not exist"):
        import_peft(lib, tmp_path / "nowhere", "x")
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "token_dim": 32,
         "base_model_name_or_path": "org/model"}))
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LibraryError, match="adapter_model.bin, a pickle we do not load"):
        import_peft(lib, tmp_path / "empty", "x")


def test_import_checks_shape(tmp_path, lib):
    from safetensors.torch import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "token_dim": 32,
         "num_transformer_submodules": 1, "base_model_name_or_path": "org/model"}))
    save_file({"prompt_embeddings": torch.zeros(P + 1, 32)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(LibraryError, match=r"has shape \(6, 32\) but adapter_config.json says .* \[1 \* 5, 32\]"):
        import_peft(lib, d, "x")


def test_export_refuses_attention_composer(tmp_path, lib):
    meta = {"backbone": "minilm", "family": "encoder", "provenance": {"strategy": "attention"}}
    lib.save("att", _prompt(), meta, extras={"composer": {"down.weight": torch.zeros(4, 32)}})
    with pytest.raises(LibraryError, match=r"^prompt 'att' is an attention composer \(per-example prompts\); "
                                           r"distill it first: prompt-composer compose \.\.\. --distill$"):
        export_peft(lib, "att", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    lib.save("att-extra-only", _prompt(), {"backbone": "minilm", "family": "encoder"},
             extras={"composer": {"down.weight": torch.zeros(4, 32)}})
    with pytest.raises(LibraryError, match="is an attention composer"):
        export_peft(lib, "att-extra-only", tmp_path / "out")

    distilled = {"backbone": "minilm", "family": "encoder", "provenance": {"strategy": "attention", "distilled": True}}
    lib.save("att-static", _prompt(), distilled)
    assert (export_peft(lib, "att-static", tmp_path / "out") / "adapter_model.safetensors").exists()


def test_export_refuses_non_empty_folder(tmp_path, lib):
    lib.save("p", _prompt(), {"backbone": "minilm", "family": "encoder"})
    out = tmp_path / "out"
    out.mkdir()
    export_peft(lib, "p", out)  # an empty folder is fine
    with pytest.raises(LibraryError, match=r"out exists and is not empty; give a new folder or pass overwrite"):
        export_peft(lib, "p", out)
    lib.save("p", _prompt(9), {"backbone": "minilm", "family": "encoder"})
    export_peft(lib, "p", out, overwrite=True)
    assert torch.equal(import_peft(lib, out, "q").prompt, _prompt(9))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_encoder_prompt_in_front_exports_with_identical_outputs(tmp_path, tokenizer, lib):
    """--prompt-position front puts the prompt where PEFT does (prompt [CLS] rest): PEFT's encoder outputs and
    ours are the same, on right-padded batches too; the import records the placement."""
    from transformers import AutoModel

    from composer.backbones import load_backbone
    from composer.model import from_library

    model_dir = _save_model("encoder", tmp_path / "base")
    prompt = _prompt(5)
    lib.save("p", prompt, {"backbone": str(model_dir), "family": "encoder", "position": "front"})
    out = export_peft(lib, "p", tmp_path / "adapter")
    pmodel = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(model_dir), out).eval()
    pm = from_library(lib.load("p"), load_backbone(str(model_dir)), SPEC, head="linear").eval()
    assert pm.position == "front" and not pm.after_first
    ids, mask = _batch(tokenizer, ["the film was good", "bad"])
    with torch.no_grad():
        theirs = pmodel(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds, m, n, _ = pm.prompted(ids, mask)
        ours = pm.hidden(embeds, m)
    assert n == P
    keep = m.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-5, rtol=0)
    # after-cls (the default) differs by the [CLS] placement
    lib.save("q", prompt, {"backbone": str(model_dir), "family": "encoder"})
    pq = from_library(lib.load("q"), load_backbone(str(model_dir)), SPEC, head="linear").eval()
    with torch.no_grad():
        e, mq, _, _ = pq.prompted(ids, mask)
        assert not torch.allclose(pq.hidden(e, mq)[keep], theirs[keep], atol=1e-3)
    # a bare PEFT adapter comes in front; ours going home keep theirs
    assert import_peft(lib, out, "back").meta["position"] == "front"
    (out / "prompt-composer.json").unlink()
    assert import_peft(lib, out, "bare").meta["position"] == "front"


def test_mpt_entry_exports_as_a_multitask_prompt_tuning_adapter_with_each_tasks_logits(tmp_path, tokenizer, lib):
    """An MPT entry (P*, every task's rank-1 factors) is PEFT's MultitaskPromptTuning layout: loaded with
    PeftModel.from_pretrained, task id k gives our logits for task k's prompt P* ∘ (u_k v_kᵀ)."""
    from transformers import AutoModelForCausalLM

    from composer.mpt import MPT_EXTRA, mpt_prompts

    model_dir = _save_model("decoder", tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    shared, u, v = _prompt(), 1 + 0.3 * torch.randn(2, P, 1, generator=g), 1 + 0.3 * torch.randn(2, 1, 32, generator=g)
    tasks = ["polarity", "topic"]
    lib.save("m", shared, {"backbone": str(model_dir), "family": "decoder", "task": "polarity",
                           "provenance": {"shared": "mpt", "tasks": tasks}}, extras={MPT_EXTRA: {"u": u, "v": v}})
    out = export_peft(lib, "m", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_tasks"], cfg["num_ranks"]) == ("MULTITASK_PROMPT_TUNING", 2, 1)
    assert json.loads((out / "prompt-composer.json").read_text())["task_ids"] == {"polarity": 0, "topic": 1}

    pmodel = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    ids, mask = _batch(tokenizer, ["the film was good", "bad"])
    bb = wrap(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, name=str(model_dir), family="decoder")
    for k in range(2):
        pk = mpt_prompts(shared, u, v, torch.tensor([k]))[0]  # [P, H]
        pm = build_model(bb, SPEC, pk)
        with torch.no_grad():
            theirs = pmodel(input_ids=ids, attention_mask=mask, task_ids=torch.full((2,), k)).logits
            embeds, full_mask, _, _ = pm.prompted(ids, mask)
            ours = pm.network(inputs_embeds=embeds, attention_mask=full_mask).logits
        real = full_mask.bool()
        torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)
    # an MPT prefix has no PEFT counterpart: one line, nothing written
    lib.save("mp", torch.randn(2, 2, P, 32), {"backbone": str(model_dir), "family": "decoder", "kind": "prefix",
                                              "hidden_size": 32,
                                              "provenance": {"shared": "mpt", "tasks": tasks}},
             extras={MPT_EXTRA: {"u": torch.ones(2, 2 * 2 * P, 1), "v": torch.ones(2, 1, 32)}})
    with pytest.raises(LibraryError, match=r"^prompt 'mp' is an MPT prefix, and PEFT's MultitaskPromptTuning holds"):
        export_peft(lib, "mp", tmp_path / "adapter2")
    assert not (tmp_path / "adapter2").exists()
