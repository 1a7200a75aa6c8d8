"""Deep prompts (--kind prefix) on tiny encoder, decoder and encoder-decoder models.

The references are PEFT's PrefixTuning (same weights, same logits), the decoder identity "the prefix an
input-level prompt induces = that prompt in front", and the model's own cache-less decoding.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from composer.backbones import wrap
from composer.compose import ComposeConfig, compose
from composer.config import TrainConfig
from composer.errors import ComposeError, ComposerError, LibraryError, TrainingError
from composer.library import Library
from composer.model import build_model, freeze_backbone, from_library
from composer.prefix import PrefixPrompt, flat, geometry, induced_prefix, unflat
from composer.prompts import init_prompt
from composer.train import train

from .conftest import tiny_model

SPEC = types.SimpleNamespace(name="t", labels=["0", "1"], label_words=[" bad", " good"], label_descriptions=None,
                             head=None, num_labels=2)
IDS = torch.tensor([[101, 2000, 2001, 2002, 102], [101, 2003, 102, 0, 0]])
MASK = (IDS != 0).long()
HEAD = {"encoder": "label-similarity", "decoder": "verbalizer", "encoder-decoder": "verbalizer"}


def _peft(network, family: str, P: int):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    tt = {"encoder": TaskType.FEATURE_EXTRACTION, "decoder": TaskType.CAUSAL_LM,
          "encoder-decoder": TaskType.SEQ_2_SEQ_LM}[family]
    pm = get_peft_model(network, PrefixTuningConfig(task_type=tt, num_virtual_tokens=P)).eval()
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    return pm


def _from_peft_weight(W: torch.Tensor, L: int, family: str) -> torch.Tensor:
    """PEFT's prefix table [P, L*2*D] -> ours [L, 2, P, D] (for seq2seq, the rows PEFT's layout feeds each
    decoder layer: pair (4l mod 2L) of the table, as peft 0.21's get_prompt splits it)."""
    P = W.shape[0]
    rows = W.view(P, 2 * L, -1)  # [P, 2L, D]
    if family == "encoder-decoder":
        idx = [(4 * l) % (2 * L) for l in range(L)]
        return torch.stack([rows[:, [i, i + 1]] for i in idx]).permute(0, 2, 1, 3)  # [L, 2, P, D]
    return rows.view(P, L, 2, -1).permute(1, 2, 0, 3)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
def test_forward_equals_peft_prefix_tuning(tokenizer, family):
    net = tiny_model(family).eval()
    bb = wrap(net, tokenizer, name=f"tiny-{family}", family=family)
    peft_model = _peft(net, family, P=3)
    geo = geometry(net, family)
    prefix = _from_peft_weight(peft_model.prompt_encoder.default.embedding.weight.detach(), geo.num_layers, family)
    pm = build_model(bb, SPEC, prefix, head=HEAD[family]).eval()
    with torch.no_grad(), pm.using_prefix(prefix.unsqueeze(0).expand(2, *prefix.shape)):
        if family == "encoder":
            ref = peft_model(input_ids=IDS, attention_mask=MASK).last_hidden_state
            got = pm.hidden(pm.embed(IDS), MASK)
        elif family == "decoder":
            ref = peft_model(input_ids=IDS, attention_mask=MASK).logits
            kw, m = pm._with_prefix(2, MASK)
            got = net(input_ids=IDS, attention_mask=m, **kw).logits
        else:
            dec = torch.tensor([[0, 2000], [0, 2001]])
            ref = peft_model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=dec).logits
            got = net(input_ids=IDS, attention_mask=MASK, decoder_input_ids=dec, **pm.decoder_prefix(2)).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_an_induced_prefix_is_the_prompt_in_front_on_a_decoder(tokenizer):
    """In a causal decoder the keys and values at a prompt's positions do not depend on what follows, so the
    prefix a prompt induces gives exactly the logits of that prompt in front of the input."""
    net = tiny_model("decoder").eval()
    bb = wrap(net, tokenizer, name="tiny-decoder", family="decoder")
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    with_prompt = build_model(bb, SPEC, prompt, head="verbalizer").eval()
    with_prefix = build_model(bb, SPEC, induced_prefix(net, "decoder", prompt), head="verbalizer").eval()
    ids, mask = IDS[:1], MASK[:1]  # one unpadded row: positions agree exactly
    with torch.no_grad():
        torch.testing.assert_close(with_prefix(ids, mask), with_prompt(ids, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["encoder", "decoder", "encoder-decoder"])
def test_only_the_prefix_gets_gradients(tiny_backbone, family):
    prefix, prov = init_prompt("random", 3, tiny_backbone, SPEC, seed=0, kind="prefix")
    geo = geometry(tiny_backbone.network, family)
    assert prov["kind"] == "prefix" and tuple(prefix.shape) == (geo.num_layers, 2, 3, geo.kv_size)
    pm = build_model(tiny_backbone, SPEC, prefix, head=HEAD[family])
    freeze_backbone(pm)
    pm(IDS, MASK).sum().backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads == {"prompt_source.weight"}
    assert pm.prompt_source.weight.grad.abs().sum() > 0


def test_padding_does_not_change_an_encoder_row(tokenizer):
    bb = wrap(tiny_model("encoder").eval(), tokenizer, name="tiny-encoder", family="encoder")
    prefix, _ = init_prompt("vocab", 3, bb, SPEC, seed=0, kind="prefix")
    pm = build_model(bb, SPEC, prefix, head="label-similarity").eval()
    with torch.no_grad():
        both = pm(IDS, MASK)
        alone = pm(IDS[1:, :3], MASK[1:, :3])
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-4)


def test_generation_with_a_prefix_is_the_same_with_the_cache_on_and_off(tokenizer):
    bb = wrap(tiny_model("decoder").eval(), tokenizer, name="tiny-decoder", family="decoder")
    prefix, _ = init_prompt("random", 4, bb, SPEC, seed=2, kind="prefix")
    pm = build_model(bb, SPEC, prefix * 20, head="verbalizer").eval()  # a strong prefix: it must matter
    on = pm.generate(IDS, MASK, max_new_tokens=6, use_cache=True)
    off = pm.generate(IDS, MASK, max_new_tokens=6, use_cache=False)
    assert torch.equal(on, off)
    plain = build_model(bb, SPEC, torch.zeros(1, 32), head="verbalizer").eval()
    assert not torch.equal(on, plain.generate(IDS, MASK, max_new_tokens=6))


def test_reparameterisation_starts_at_the_init_and_folds_away():
    init = torch.randn(2, 2, 3, 8)
    src = PrefixPrompt(init, projection=16)
    torch.testing.assert_close(src.static(), init)
    with torch.no_grad():
        src.mlp[2].bias.fill_(0.5)
    assert not torch.allclose(src.static(), init)
    assert src.static().shape == init.shape and not src.static().requires_grad


def test_flat_view_round_trips():
    x = torch.randn(3, 2, 4, 5)
    assert flat(x).shape == (24, 5) and torch.equal(unflat(flat(x), 3), x)


# -- the library, and loading into the wrong backbone ---------------------------------------------------
def test_library_keeps_the_kind_and_refuses_another_geometry(tokenizer):
    from transformers import BertConfig, BertModel

    bb = wrap(tiny_model("encoder"), tokenizer, name="tiny-encoder", family="encoder")
    prefix, _ = init_prompt("random", 3, bb, SPEC, seed=0, kind="prefix")
    lib = Library()
    lib.save("p", prefix, {"task": "t", "backbone": "tiny-encoder", "family": "encoder", "hidden_size": 32,
                           "kind": "prefix", "head": "label-similarity"})
    e = lib.load("p")
    assert e.meta["kind"] == "prefix" and e.meta["length"] == 3 and torch.equal(e.prompt, prefix)
    assert from_library(e, bb, SPEC).kind == "prefix"
    deeper = wrap(BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=64)), tokenizer, name="deeper", family="encoder")
    with pytest.raises(LibraryError, match=r"for 2 layers of key/value width 32, but backbone 'deeper' has 3 layers"):
        from_library(e, deeper, SPEC)


def test_a_prefix_cannot_become_a_prompt(tokenizer):
    bb = wrap(tiny_model("encoder"), tokenizer, name="tiny-encoder", family="encoder")
    lib = Library()
    prefix, _ = init_prompt("random", 3, bb, SPEC, seed=0, kind="prefix")
    lib.save("p", prefix, {"task": "t", "backbone": "tiny-encoder", "family": "encoder", "hidden_size": 32,
                           "kind": "prefix"})
    with pytest.raises(ComposerError, match="cannot be turned back into input embeddings; use --kind prefix"):
        init_prompt("library:p", 3, bb, SPEC, library=lib, kind="prompt")
    lib.save("q", torch.randn(3, 32), {"task": "t", "backbone": "tiny-encoder", "family": "encoder"})
    induced, prov = init_prompt("library:q", 3, bb, SPEC, library=lib, kind="prefix")
    assert induced.shape == prefix.shape and prov["induced_from"] == "prompt"


def test_prefix_with_gradient_checkpointing_is_refused():
    with pytest.raises(TrainingError, match="--kind prefix with --gradient-checkpointing"):
        TrainConfig(task="x", kind="prefix", gradient_checkpointing=True)
    with pytest.raises(TrainingError, match="--prefix-projection reparameterises a prefix"):
        TrainConfig(task="x", prefix_projection=8)


def test_an_encoder_decoder_head_that_reads_the_encoder_is_refused(tokenizer):
    bb = wrap(tiny_model("encoder-decoder"), tokenizer, name="tiny-t5", family="encoder-decoder")
    prefix, _ = init_prompt("random", 2, bb, SPEC, seed=0, kind="prefix")
    pm = build_model(bb, SPEC, prefix, head="linear")
    with pytest.raises(ComposerError, match="reaches its decoder, and this head reads the encoder"):
        pm(IDS, MASK)


# -- training and composing -------------------------------------------------------------------------
def test_train_a_prefix_saves_it_with_its_kind(toy_task, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(task=str(toy_task), backbone=str(tiny_bert_dir), kind="prefix", prompt_length=3, steps=6,
                      batch_size=8, lr=0.05, eval_every=3, max_eval=20, run_dir=str(tmp_path / "run"), save="pre")
    r = train(cfg, progress=False)
    e = Library().load("pre")
    assert e.meta["kind"] == "prefix" and e.prompt.dim() == 4 and r["steps"] == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["kind"] == "prefix"
    ckpt = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    assert set(ckpt) == {"prompt_source.weight"}  # only the prefix trained (and is what resuming restores)


@pytest.fixture
def prefix_graph(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    from composer.backbones import load_backbone

    monkeypatch.chdir(tmp_path)

    bb = load_backbone(str(tiny_bert_dir))
    lib = Library()
    for i, name in enumerate(("pos-p", "neg-p", "other-p")):
        prefix, _ = init_prompt("random", 3, bb, SPEC, seed=i, kind="prefix")
        lib.save(name, prefix, {"task": "toy", "backbone": str(tiny_bert_dir), "family": "encoder",
                                "hidden_size": 32, "kind": "prefix", "head": "label-similarity"})
    from .test_compose import graph_yaml

    return lib, graph_yaml(tmp_path), bb


@pytest.mark.parametrize("strategy", ["best", "average", "linear", "attention", "concat"])
def test_every_strategy_composes_prefixes(prefix_graph, strategy):
    lib, g, bb = prefix_graph
    r = compose(ComposeConfig(graph=str(g), target="toy", shots=4, seed=0, strategy=strategy, save="c",
                              steps=2 if strategy == "attention" else 0), library=lib, backbone=bb)
    e = lib.load("c")
    assert e.meta["kind"] == "prefix" and e.prompt.dim() == 4
    P = 3 * (2 if strategy == "concat" else 1)  # concat joins the two subtasks along P
    assert list(e.prompt.shape) == [2, 2, P, 32] and r["shape"] == [2, 2, P, 32]
    pm = from_library(e, bb, SPEC)
    assert pm.kind == "prefix" and torch.isfinite(pm(IDS, MASK)).all()


def test_prompts_and_prefixes_do_not_mix_in_a_composition(prefix_graph):
    lib, g, bb = prefix_graph
    lib.save("other-p", torch.randn(3, 32), {"task": "toy", "backbone": lib.meta("pos-p")["backbone"],
                                             "family": "encoder"})
    with pytest.raises(ComposeError, match="differ in kind: .*pos-p=prefix.*other-p=prompt"):
        compose(ComposeConfig(graph=str(g), target="toy", shots=4, strategy="average"), library=lib, backbone=bb)


# -- PEFT interop -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_export_loads_in_peft_prefix_tuning_with_identical_outputs_and_imports_back(tokenizer, tmp_path, family):
    from peft import PeftModel

    from composer.peft_io import export_peft, import_peft

    net = tiny_model(family).eval()
    net.save_pretrained(tmp_path / "base")
    bb = wrap(net, tokenizer, name=str(tmp_path / "base"), family=family)
    prefix, _ = init_prompt("random", 3, bb, SPEC, seed=4, kind="prefix")
    lib = Library()
    geo = geometry(net, family)
    lib.save("p", prefix, {"task": "t", "backbone": str(tmp_path / "base"), "family": family, "hidden_size": 32,
                           "kind": "prefix", "prefix_heads": geo.kv_heads})
    out = export_peft(lib, "p", tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    peft_model = PeftModel.from_pretrained(tiny_model(family).eval(), out).eval()
    peft_model.base_model.load_state_dict(net.state_dict())  # the same weights as ours
    pm = build_model(bb, SPEC, prefix, head=HEAD[family]).eval()
    with torch.no_grad(), pm.using_prefix(prefix.unsqueeze(0).expand(2, *prefix.shape)):
        if family == "encoder":
            ref, got = peft_model(input_ids=IDS, attention_mask=MASK).last_hidden_state, pm.hidden(pm.embed(IDS), MASK)
        else:
            kw, m = pm._with_prefix(2, MASK)
            ref, got = peft_model(input_ids=IDS, attention_mask=MASK).logits, net(input_ids=IDS, attention_mask=m, **kw).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    back = import_peft(lib, out, "p2")
    assert back.meta["kind"] == "prefix" and torch.equal(back.prompt, prefix)


def test_an_encoder_decoder_prefix_does_not_export_and_other_adapters_are_refused(tokenizer, tmp_path):
    from composer.peft_io import export_peft, import_peft

    bb = wrap(tiny_model("encoder-decoder"), tokenizer, name="tiny-t5", family="encoder-decoder")
    prefix, _ = init_prompt("random", 2, bb, SPEC, seed=0, kind="prefix")
    lib = Library()
    lib.save("s", prefix, {"task": "t", "backbone": "tiny-t5", "family": "encoder-decoder", "hidden_size": 32,
                           "kind": "prefix"})
    with pytest.raises(LibraryError, match="only encoder and decoder prefixes export"):
        export_peft(lib, "s", tmp_path / "x")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(LibraryError, match="is a LORA adapter; only PROMPT_TUNING .* and PREFIX_TUNING"):
        import_peft(lib, tmp_path / "lora", "l")
