"""ATTEMPT's attention composer on hand-made tensors: no model anywhere."""
from __future__ import annotations

import math

import pytest
import torch

from composer.attention import AttentionComposer
from composer.errors import ComposeError

K, P, H = 3, 4, 8


@pytest.fixture
def cands() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(K, P, H, generator=g)  # [K, P, H]


def batch(B=5, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)  # [B, T, H]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[B - 1, 2:] = 0
    return x, mask


def test_attention_shapes_and_weights(cands):
    comp = AttentionComposer(cands, rank=4, seed=0)
    x, mask = batch()
    prompts, a = comp(x, mask)
    assert prompts.shape == (5, P, H)
    assert a.shape == (5, K + 1)
    assert torch.allclose(a.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.equal(comp.last_weights, a.detach())
    # per-example prompt = target + sum over K+1 (the target among them), as ATTEMPT
    attended = torch.cat([cands, comp.target_prompt.detach().unsqueeze(0)])
    expected = torch.einsum("bk,kph->bph", a.detach(), attended) + comp.target_prompt.detach()
    assert torch.allclose(prompts.detach(), expected, atol=1e-6)
    assert comp.temperature == pytest.approx(H * math.e)


def test_attention_gradient_flow(cands):
    comp = AttentionComposer(cands, target_init=torch.randn(P, H), rank=4, seed=0)
    trainable = {n for n, p in comp.named_parameters() if p.requires_grad}
    assert trainable == {"target_prompt", "down.weight", "up.weight", "layer_norm.weight", "layer_norm.bias"}
    assert not comp.candidates.requires_grad
    assert "candidates" in dict(comp.named_buffers())
    x, mask = batch()
    prompts, a = comp(x, mask)
    (prompts.pow(2).sum() + (a[:, 0] * 10).sum()).backward()
    for name in trainable:
        grad = dict(comp.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert comp.candidates.grad is None


def test_attention_masked_max_pool_ignores_padding(cands):
    comp = AttentionComposer(cands, rank=4, seed=0)
    x, mask = batch()
    prompts, a = comp(x, mask)
    spoiled = x.clone()
    spoiled[mask == 0] = 1e6  # pads that would win an unmasked max
    prompts2, a2 = comp(spoiled, mask)
    assert torch.equal(a, a2) and torch.equal(prompts, prompts2)
    # and a row padded at the end pools like the same row unpadded
    p_short, _ = comp(x[1:2, :4], mask[1:2, :4])
    assert torch.allclose(p_short[0], prompts[1], atol=1e-6)
    # no mask means every token counts
    p_all, _ = comp(spoiled)
    assert not torch.allclose(p_all, prompts)


def test_attention_temperature(cands):
    x, mask = batch()
    hot = AttentionComposer(cands, rank=4, temperature=1e6, seed=0)
    _, a = hot(x, mask)
    assert torch.allclose(a, torch.full_like(a, 1 / (K + 1)), atol=1e-4)
    cold = AttentionComposer(cands, rank=4, temperature=1e-4, seed=0)
    _, a = cold(x, mask)
    assert torch.allclose(a.max(-1).values, torch.ones(5), atol=1e-5)  # one-hot: argmax of the scores


def test_attention_save_load_round_trip(cands, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    comp = AttentionComposer(cands, target_init=torch.randn(P, H), rank=4, seed=0)
    with torch.no_grad():  # move off the init so the round trip is not trivially equal
        comp.layer_norm.bias.add_(0.1)
        comp.down.weight.add_(0.05)
    tensors, config = comp.state_for_save()
    assert sorted(tensors) == sorted(AttentionComposer._TENSOR_KEYS)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    save_file(tensors, str(tmp_path / "attention.safetensors"))
    loaded = AttentionComposer.from_saved(load_file(str(tmp_path / "attention.safetensors")),
                                          dict(config, future_key=1))
    assert "unknown keys ['future_key']" in caplog.text
    x, mask = batch()
    p1, a1 = comp(x, mask)
    p2, a2 = loaded(x, mask)
    assert torch.equal(p1, p2) and torch.equal(a1, a2)


def test_attention_from_saved_errors(cands):
    tensors, config = AttentionComposer(cands, rank=4, seed=0).state_for_save()
    with pytest.raises(ComposeError, match=r"config lacks \['rank'\]"):
        AttentionComposer.from_saved(tensors, {k: v for k, v in config.items() if k != "rank"})
    with pytest.raises(ComposeError, match="config kind must be 'attention', got 'linear'"):
        AttentionComposer.from_saved(tensors, dict(config, kind="linear"))
    with pytest.raises(ComposeError, match=r"tensors lack \['up.weight'\]"):
        AttentionComposer.from_saved({k: v for k, v in tensors.items() if k != "up.weight"}, config)
    with pytest.raises(ComposeError, match=r"'down.weight' has shape \[4, 8\], expected \[5, 8\]"):
        AttentionComposer.from_saved(tensors, dict(config, rank=5))


def test_attention_distill(cands):
    comp = AttentionComposer(cands, target_init=torch.randn(P, H), rank=4, seed=0)
    batches = [batch(B=3, seed=1), batch(B=5, seed=2)]
    static = comp.distill(batches)
    assert static.shape == (P, H)
    outs = torch.cat([comp(x, m)[0] for x, m in batches])  # [8, P, H]
    assert torch.allclose(static, outs.mean(0), atol=1e-6)
    comp.train()
    comp.distill(batches)
    assert comp.training
    with pytest.raises(ComposeError, match="distill needs at least one input example"):
        comp.distill([])


def test_attention_errors(cands):
    with pytest.raises(ComposeError, match=r"no candidate prompts \(K == 0\)"):
        AttentionComposer(torch.zeros(0, P, H))
    with pytest.raises(ComposeError, match=r"differ in prompt length P: #0 is \[4, 8\] but #1 is \[3, 8\]"):
        AttentionComposer([torch.zeros(4, 8), torch.zeros(3, 8)])
    with pytest.raises(ComposeError, match=r"temperature must be a finite number > 0, got -2"):
        AttentionComposer(cands, temperature=-2)
    with pytest.raises(ComposeError, match="rank .* must be >= 1, got 0"):
        AttentionComposer(cands, rank=0)
    with pytest.raises(ComposeError, match=r"dropout must be in \[0, 1\), got 1.5"):
        AttentionComposer(cands, dropout=1.5)
    with pytest.raises(ComposeError, match=r"target_init must be \[P, H\] = \[4, 8\] .* got \[4, 6\]"):
        AttentionComposer(cands, target_init=torch.zeros(4, 6))
    comp = AttentionComposer(cands, rank=4, seed=0)
    x, mask = batch()
    with pytest.raises(ComposeError, match=r"input_embeds must be \[B, T, H\] with H = 8, got \[5, 6, 7\]"):
        comp(torch.zeros(5, 6, 7), mask)
    with pytest.raises(ComposeError, match=r"attention_mask must be \[B, T\] = \[5, 6\] .* got \[5, 5\]"):
        comp(x, mask[:, :5])
    mask[2] = 0
    with pytest.raises(ComposeError, match=r"attention_mask has no tokens in batch rows \[2\]"):
        comp(x, mask)


def test_attention_dropout_only_in_training(cands):
    comp = AttentionComposer(cands, rank=4, dropout=0.5, seed=0).eval()
    x, mask = batch()
    assert torch.equal(comp(x, mask)[0], comp(x, mask)[0])
