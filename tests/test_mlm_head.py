"""The mlm scoring head (LM-BFF): a [MASK] before [SEP], the label words' log-probabilities there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer.backbones import load_backbone, wrap
from composer.heads import resolve_head
from composer.errors import ComposerError, TaskError
from composer.heads import insert_at
from tests.test_model import batch, spec
from tests.test_model import make as make_pm

KW = dict(vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)


def tiny_mlm(kind: str):
    """Tiny masked LMs from configs: BERT (its `cls` head), RoBERTa (its `lm_head`), DistilBERT (neither)."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "bert":
        return T.BertForMaskedLM(T.BertConfig(num_hidden_layers=2, **KW))
    if kind == "roberta":
        return T.RobertaForMaskedLM(T.RobertaConfig(num_hidden_layers=2, pad_token_id=0, **KW))
    return T.DistilBertForMaskedLM(T.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4,
                                                      hidden_dim=64, max_position_embeddings=256))


def make(bb, words=(" bad", " good")):
    return make_pm(bb, words).eval()  # no head given: an encoder with its MLM head defaults to mlm


def test_insert_at_shifts_the_rest_right():
    e = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)  # rows [0 1 2 3], [4 5 6 7]
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    x, xm = insert_at(e, m, torch.tensor([3, 1]), torch.tensor([-1.0]))
    assert x[..., 0].tolist() == [[0, 1, 2, -1, 3], [4, -1, 5, 6, 7]]
    assert xm.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    x, xm = insert_at(e, m, torch.tensor([4, 2]), torch.tensor([-1.0]))  # at the very end / after the last real
    assert x[0, :, 0].tolist() == [0, 1, 2, 3, -1] and xm.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_mlm_head_equals_manual_masked_lm(kind, tokenizer):
    bb = wrap(tiny_mlm(kind), tokenizer, name=f"tiny-{kind}-mlm", family="encoder")
    assert bb.has_mlm_head and resolve_head(spec(), bb) == "mlm"
    pm = make(bb)
    assert pm.head.kind == "mlm"
    ids, mask = batch(tokenizer)
    logits = pm(ids, mask)
    assert logits.shape == (3, 2)
    prompt, emb = pm.prompt_source.weight, bb.network.get_input_embeddings()
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" bad", " good")]
    for b in range(3):
        n = int(mask[b].sum())
        x = emb(ids[b : b + 1, :n])  # [CLS] text [SEP]
        m = emb(torch.tensor([[tokenizer.mask_token_id]]))
        full = torch.cat([x[:, :1], prompt[None], x[:, 1 : n - 1], m, x[:, n - 1 :]], 1)
        at = 1 + prompt.shape[0] + (n - 2)
        logp = F.log_softmax(bb.network(inputs_embeds=full).logits[0, at], -1)
        torch.testing.assert_close(logits[b], logp[words], atol=1e-4, rtol=1e-4)


def test_mlm_head_gives_the_prompt_a_gradient(tokenizer):
    pm = make(wrap(tiny_mlm("bert"), tokenizer, name="tiny-mlm", family="encoder"))
    ids, mask = batch(tokenizer)
    F.cross_entropy(pm(ids, mask), torch.tensor([1, 0, 0])).backward()
    g = pm.prompt_source.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert all(p.grad is None for p in pm.network.parameters())


def test_loading_keeps_the_masked_lm_head_the_checkpoint_has(tokenizer, tiny_bert_dir, tmp_path):
    d = tmp_path / "mlm"
    tiny_mlm("bert").save_pretrained(d)
    tokenizer.save_pretrained(d)
    bb = load_backbone(str(d))
    assert bb.has_mlm_head and resolve_head(spec(), bb) == "mlm"
    plain = load_backbone(str(tiny_bert_dir))  # a checkpoint without one (like minilm)
    assert not plain.has_mlm_head and resolve_head(spec(), plain) == "label-similarity"
    with pytest.raises(ComposerError, match="the mlm head needs an encoder loaded with its masked-LM head"):
        resolve_head(spec(), plain, "mlm")
    with pytest.raises(TaskError, match=r"needs one token per label word.*' very good' -> 2 tokens"):
        make(bb, words=(" bad", " very good"))


def test_train_and_reload_with_the_mlm_head(toy_task, tokenizer, tmp_path):
    from composer.encoding import encode_split
    from composer.model import from_library
    from composer.evaluate import predict, score
    from composer.library import Library
    from composer.taskdata import load_splits
    from composer.tasks import load_task
    from composer.train import TrainConfig, train

    d = tmp_path / "mlm"
    tiny_mlm("bert").save_pretrained(d)
    tokenizer.save_pretrained(d)
    r = train(TrainConfig(task=str(toy_task), backbone=str(d), prompt_length=4, steps=6, batch_size=8, lr=0.1,
                          eval_every=3, max_eval=40, run_dir=str(tmp_path / "run"), save="m"), progress=False)
    e = Library().load("m")
    assert e.meta["head"] == "mlm"
    spec_ = load_task(str(toy_task))
    pm = from_library(e, load_backbone(str(d)), spec_)
    enc = encode_split(spec_, load_splits(spec_, splits=["dev"])["dev"], pm.backbone.tokenizer)
    assert score(spec_, predict(pm, enc), enc)["score"] == pytest.approx(r["dev"]["score"])
