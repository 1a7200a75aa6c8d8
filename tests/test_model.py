"""The prompted model: prepend math, heads against manual computations, masks, gradients, generation."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from composer.model import build_model, freeze_backbone
from composer.prompts import init_prompt
from composer.model import set_activation_checkpointing
from composer.prompts import prepend

SENTS = ["the film was great fun", "awful", "a dull and lifeless book that nobody should read"]


def spec(words=(" bad", " good")):
    return types.SimpleNamespace(name="t", labels=["0", "1"], label_words=list(words),
                                 label_descriptions=["a negative opinion", "a positive opinion"], head=None)


def batch(tok, sents=SENTS):
    x = tok(sents, return_tensors="pt", padding=True)
    return x["input_ids"], x["attention_mask"]


def make(backbone, words=(" bad", " good"), P=4, head=None, seed=0):
    p, _ = init_prompt("random", P, backbone, spec(words), seed=seed)
    pm = build_model(backbone, spec(words), p, head=head)
    freeze_backbone(pm)
    return pm


# -- prepend ---------------------------------------------------------------------------------------
def test_prepend_front_and_after_first():
    B, T, P, H = 2, 5, 3, 4
    e = torch.randn(B, T, H)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    p = torch.randn(P, H)
    out, om = prepend(e, m, p)
    assert out.shape == (B, P + T, H)
    assert torch.equal(out[:, :P], p.expand(B, P, H)) and torch.equal(out[:, P:], e)
    assert om.tolist() == [[1] * 8, [1, 1, 1, 1, 1, 1, 0, 0]]
    out, om = prepend(e, m, p, after_first=True)
    assert torch.equal(out[:, 0], e[:, 0]) and torch.equal(out[:, 1 : 1 + P], p.expand(B, P, H))
    assert torch.equal(out[:, 1 + P :], e[:, 1:])
    assert om.tolist()[1] == [1, 1, 1, 1, 1, 1, 0, 0]


def test_prepend_per_example_prompts():
    e, m = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    p = torch.randn(2, 5, 4)
    out, _ = prepend(e, m, p)
    assert torch.equal(out[1, :5], p[1])
    with pytest.raises(ValueError, match="does not fit"):
        prepend(e, m, torch.randn(3, 5, 4))


# -- each family against a manual computation ------------------------------------------------------
def test_forward_equals_manual_concatenation(tiny_backbone, tokenizer):
    bb = tiny_backbone
    pm = make(bb)
    ids, mask = batch(tokenizer)
    logits = pm(ids, mask)
    assert logits.shape == (3, 2)
    prompt = pm.prompt_source.weight
    emb = bb.network.get_input_embeddings()
    model = bb.network
    for b in range(3):
        n = int(mask[b].sum())
        x = emb(ids[b : b + 1, :n])
        if bb.family == "encoder":  # [CLS] prompt rest, mean-pooled, cosine with label descriptions
            full = torch.cat([x[:, :1], prompt[None], x[:, 1:]], 1)
            h = model(inputs_embeds=full).last_hidden_state.mean(1)
            lab = [model(**tokenizer(d, return_tensors="pt")).last_hidden_state.mean(1)
                   for d in spec().label_descriptions]
            want = torch.cat([F.cosine_similarity(h, l_) for l_ in lab]) / 0.05
        elif bb.family == "decoder":  # next-token log-prob of each label word after the input
            full = torch.cat([prompt[None], x], 1)
            logp = F.log_softmax(model(inputs_embeds=full).logits[0, -1], -1)
            want = torch.stack([logp[tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in (" bad", " good")])
        else:  # decoder log-likelihood of the label tokens given the prompted encoder input
            full = torch.cat([prompt[None], x], 1)
            want = []
            for w in (" bad", " good"):
                lab = torch.tensor([tokenizer(w, add_special_tokens=False)["input_ids"]])
                out = model(inputs_embeds=full, labels=lab)
                want.append(-out.loss * lab.shape[1])
            want = torch.stack(want)
        torch.testing.assert_close(logits[b], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fam", ["decoder", "encoder-decoder"])
def test_multi_token_label_words(fam, tokenizer):
    from composer.backbones import wrap
    from tests.conftest import tiny_model

    bb = wrap(tiny_model(fam), tokenizer, "tiny", fam)
    words = (" bad", " very good indeed")
    pm = make(bb, words)
    assert not pm.head.single
    ids, mask = batch(tokenizer)
    logits = pm(ids, mask)
    prompt = pm.prompt_source.weight
    for b in range(3):
        n = int(mask[b].sum())
        for c, w in enumerate(words):
            lab = tokenizer(w, add_special_tokens=False)["input_ids"]
            if fam == "decoder":
                seq = torch.cat([prompt[None], bb.network.get_input_embeddings()(
                    torch.tensor([ids[b, :n].tolist() + lab]))], 1)
                logp = F.log_softmax(bb.network(inputs_embeds=seq).logits[0], -1)
                start = prompt.shape[0] + n - 1
                want = sum(logp[start + i, t] for i, t in enumerate(lab))
            else:
                seq = torch.cat([prompt[None], bb.network.get_input_embeddings()(ids[b : b + 1, :n])], 1)
                want = -bb.network(inputs_embeds=seq, labels=torch.tensor([lab])).loss * len(lab)
            torch.testing.assert_close(logits[b, c], want, atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_scores(tiny_backbone, tokenizer):
    """A row scored alone equals the same row inside a padded batch (masks and positions are right)."""
    pm = make(tiny_backbone)
    ids, mask = batch(tokenizer)
    together = pm(ids, mask)
    for b, s in enumerate(SENTS):
        i, m = batch(tokenizer, [s])
        torch.testing.assert_close(pm(i, m)[0], together[b], atol=1e-4, rtol=1e-4)


def test_prompt_changes_the_scores(tiny_backbone, tokenizer):
    ids, mask = batch(tokenizer)
    a, b = make(tiny_backbone, seed=0), make(tiny_backbone, seed=1)
    assert not torch.allclose(a(ids, mask), b(ids, mask))


def test_only_the_prompt_gets_gradients(tiny_backbone, tokenizer):
    pm = make(tiny_backbone)
    ids, mask = batch(tokenizer)
    loss = F.cross_entropy(pm(ids, mask), torch.tensor([1, 0, 0]))
    loss.backward()
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_source.weight"]
    assert pm.prompt_source.weight.grad is not None and pm.prompt_source.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pm.network.parameters())


def test_linear_head_trains_beside_prompt(tiny_backbone, tokenizer):
    pm = make(tiny_backbone, head="linear")
    ids, mask = batch(tokenizer)
    F.cross_entropy(pm(ids, mask), torch.tensor([1, 0, 0])).backward()
    names = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert names == ["head.proj.bias", "head.proj.weight", "prompt_source.weight"]
    assert pm.head.proj.weight.grad is not None


@pytest.mark.parametrize("fam", ["decoder", "encoder-decoder"])
def test_generation_same_with_and_without_cache(fam, tokenizer):
    from composer.backbones import wrap
    from tests.conftest import tiny_model

    bb = wrap(tiny_model(fam), tokenizer, "tiny", fam)
    pm = make(bb, P=5)
    ids, mask = batch(tokenizer)
    lengths = []  # the decoder loop's calls: the length of the embeddings each one feeds the backbone
    hook = pm.network.register_forward_pre_hook(
        lambda m, args, kw: lengths.append(kw["inputs_embeds"].shape[1]) if "inputs_embeds" in kw else None,
        with_kwargs=True)
    on = pm.generate(ids, mask, max_new_tokens=8, use_cache=True)
    n_on, lengths_on = len(lengths), list(lengths)
    off = pm.generate(ids, mask, max_new_tokens=8, use_cache=False)
    hook.remove()
    assert on.shape[0] == 3 and on.shape[1] >= 1
    assert torch.equal(on, off)
    if fam == "decoder":  # the cache is really used: after the first call, one new token per call
        assert n_on > 1 and lengths_on[1:] == [1] * (n_on - 1) and lengths[n_on + 1] > 1
    # the prompt is really in the context: a very different prompt changes what is generated
    other = pm.generate(ids, mask, max_new_tokens=8, prompt=torch.randn(5, 32) * 10)
    assert not torch.equal(other, on)


def test_decoder_generation_matches_manual_greedy(tokenizer):
    from composer.backbones import wrap
    from tests.conftest import tiny_model

    bb = wrap(tiny_model("decoder"), tokenizer, "tiny", "decoder")
    pm = make(bb, P=3)
    ids, mask = batch(tokenizer, ["the film was"])
    got = pm.generate(ids, mask, max_new_tokens=5)
    x = torch.cat([pm.prompt_source.weight[None], bb.network.get_input_embeddings()(ids)], 1)
    want = []
    with torch.no_grad():
        for _ in range(got.shape[1]):
            t = bb.network(inputs_embeds=x).logits[0, -1].argmax()
            want.append(int(t))
            x = torch.cat([x, bb.network.get_input_embeddings()(t.view(1, 1))], 1)
    assert got[0].tolist() == want


def test_inits_shapes_and_determinism(tiny_backbone):
    bb = tiny_backbone
    for init in ("random", "vocab", "text", "text:hello world"):
        a, prov = init_prompt(init, 6, bb, spec(), seed=3)
        b, _ = init_prompt(init, 6, bb, spec(), seed=3)
        assert a.shape == (6, 32) and a.dtype == torch.float32
        assert torch.equal(a, b) and prov["init"] == init.split(":")[0]
    emb = bb.network.get_input_embeddings().weight
    t, _ = init_prompt("text:hello", 3, bb, spec())
    hello = emb[bb.tokenizer("hello", add_special_tokens=False)["input_ids"][0]]
    assert torch.equal(t[0], hello) and torch.equal(t[2], hello)  # cycled to length P


def test_bad_init_and_head_messages(tiny_backbone):
    from composer.errors import ComposerError

    with pytest.raises(ComposerError, match="unknown --init 'bogus'"):
        init_prompt("bogus", 4, tiny_backbone, spec())
    if tiny_backbone.family == "encoder":
        with pytest.raises(ComposerError, match="verbalizer head needs a decoder"):
            make(tiny_backbone, head="verbalizer")
    else:
        with pytest.raises(ComposerError, match="label-similarity head is for sentence encoders"):
            make(tiny_backbone, head="label-similarity")


def test_gradient_checkpointing_gives_the_same_prompt_gradient(tiny_backbone, tokenizer):
    """With checkpointing on, the prompt still gets its gradient (the inputs that require grad are the prompt's)."""
    ids, mask = batch(tokenizer)
    y = torch.tensor([1, 0, 0])
    grads = []
    for on in (False, True):
        pm = make(tiny_backbone)
        set_activation_checkpointing(pm.network, on)
        assert any(getattr(m, "gradient_checkpointing", False) for m in pm.network.modules()) == on
        pm.network.train()  # checkpointing acts in training mode only
        torch.manual_seed(0)  # the same dropout masks in both passes (checkpointing replays the RNG state)
        F.cross_entropy(pm(ids, mask), y).backward()
        grads.append(pm.prompt_source.weight.grad.clone())
        set_activation_checkpointing(pm.network, False)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in pm.network.modules())
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_attention_kernels_keep_cuda_attention_off_cudnn():
    """On CUDA the context leaves cuDNN's attention out (a new plan per sequence length) and keeps the others;
    afterwards the process's own settings are back; elsewhere it changes nothing."""
    from composer.model import attention_kernels

    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    with attention_kernels("cuda"):
        assert not b.cudnn_sdp_enabled()
        assert b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
    with attention_kernels("cpu"):
        assert b.cudnn_sdp_enabled() == before[0]
    assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),
            b.math_sdp_enabled()) == before
