"""Similarity metrics: hand-computed values, invariances, all-pairs = naive loop, ON, FFN capture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from composer import similarity as sim
from composer.errors import ComposerError
from composer.similarity import METRIC_HELP, METRICS, on_similarity, pairwise, spearman, topk

PROMPT_METRICS = ["cos-avg", "euclid-avg", "cos-tok", "euclid-tok"]


def naive(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """The definitions, one pair at a time."""
    out = torch.empty(len(a), len(b))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if metric == "cos-avg":
                out[i, j] = F.cosine_similarity(x.mean(0), y.mean(0), dim=0)
            elif metric == "euclid-avg":
                out[i, j] = -(x.mean(0) - y.mean(0)).norm()
            elif metric == "cos-tok":
                out[i, j] = F.cosine_similarity(x, y, dim=-1).mean()
            else:
                out[i, j] = -(x - y).norm(dim=-1).mean()
    return out


@pytest.fixture
def stacks():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)


def test_hand_computed_values():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, P=2, H=2], mean [0.5, 0.5]
    b = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # mean [0.5, 1.0]
    assert pairwise(a, b, "cos-avg").item() == pytest.approx(0.75 / math.sqrt(0.5 * 1.25), abs=1e-6)
    assert pairwise(a, b, "euclid-avg").item() == pytest.approx(-0.5, abs=1e-6)
    # token 0: cos([1,0],[1,1]) = 1/sqrt(2); token 1: cos([0,1],[0,1]) = 1
    assert pairwise(a, b, "cos-tok").item() == pytest.approx((1 / math.sqrt(2) + 1) / 2, abs=1e-6)
    # token 0: ||[0,-1]|| = 1; token 1: 0
    assert pairwise(a, b, "euclid-tok").item() == pytest.approx(-0.5, abs=1e-6)


@pytest.mark.parametrize("metric", PROMPT_METRICS)
def test_all_pairs_equal_the_naive_loop(stacks, metric):
    a, b = stacks
    assert torch.allclose(pairwise(a, b, metric), naive(a, b, metric), atol=1e-5)
    assert torch.allclose(pairwise(a, None, metric), naive(a, a, metric), atol=1e-5)


@pytest.mark.parametrize("metric", PROMPT_METRICS)
def test_chunked_equals_unchunked(stacks, metric, monkeypatch):
    a, b = stacks
    whole = pairwise(a, b, metric)
    monkeypatch.setattr(sim, "_CHUNK_ELEMENTS", 7)  # one row per chunk
    assert torch.allclose(pairwise(a, b, metric), whole, atol=1e-6)


@pytest.mark.parametrize("metric", PROMPT_METRICS)
def test_symmetry_and_self_similarity(stacks, metric):
    a, b = stacks
    s = pairwise(a, None, metric)
    assert s.shape == (5, 5) and s.dtype == torch.float32
    assert torch.allclose(s, s.T, atol=1e-6)
    assert torch.allclose(pairwise(a, b, metric), pairwise(b, a, metric).T, atol=1e-6)
    expected = 1.0 if metric.startswith("cos") else 0.0
    assert torch.allclose(s.diagonal(), torch.full((5,), expected), atol=1e-5)
    # every other prompt is less similar than a prompt to itself
    off = s[~torch.eye(5, dtype=torch.bool)]
    assert (off < expected).all()


def test_cosine_is_scale_invariant_and_euclid_is_not(stacks):
    a, b = stacks
    for metric in ("cos-avg", "cos-tok"):
        assert torch.allclose(pairwise(3.0 * a, 0.25 * b, metric), pairwise(a, b, metric), atol=1e-5)
    # cos-tok is invariant to scaling each token on its own; cos-avg is not
    per_token = torch.tensor([0.5, 2.0, 7.0])[None, :, None]
    assert torch.allclose(pairwise(a * per_token, b, "cos-tok"), pairwise(a, b, "cos-tok"), atol=1e-5)
    assert not torch.allclose(pairwise(a * per_token, b, "cos-avg"), pairwise(a, b, "cos-avg"), atol=1e-3)
    for metric in ("euclid-avg", "euclid-tok"):
        assert torch.allclose(pairwise(3.0 * a, 3.0 * b, metric), 3.0 * pairwise(a, b, metric), atol=1e-4)
        assert not torch.allclose(pairwise(3.0 * a, 3.0 * b, metric), pairwise(a, b, metric), atol=1e-3)


def test_half_precision_in_float32_out(stacks):
    a, b = stacks
    out = pairwise(a.half(), b.half(), "cos-tok")
    assert out.dtype == torch.float32
    assert torch.allclose(out, pairwise(a, b, "cos-tok"), atol=5e-3)


def test_single_prompt_is_a_stack_of_one(stacks):
    a, b = stacks
    assert pairwise(a[0], b, "cos-avg").shape == (1, 4)


def test_token_metrics_need_equal_lengths():
    a, b = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    for metric in ("cos-tok", "euclid-tok"):
        with pytest.raises(ComposerError, match=r"P=3 \(prompts_a\) and P=4 \(prompts_b\).*cos-avg"):
            pairwise(a, b, metric)
    assert pairwise(a, b, "cos-avg").shape == (2, 2)  # the averaged metrics do not care


def test_hidden_size_mismatch_and_bad_shapes():
    with pytest.raises(ComposerError, match=r"hidden sizes: 8 \(prompts_a\) vs 6 \(prompts_b\)"):
        pairwise(torch.randn(2, 3, 8), torch.randn(2, 3, 6), "cos-avg")
    with pytest.raises(ComposerError, match=r"shape \[N, P, H\]"):
        pairwise(torch.randn(2, 3, 4, 5), None, "cos-avg")


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(
        ComposerError, match="unknown similarity metric 'cosine': use one of cos-avg, euclid-avg"
    ):
        pairwise(torch.randn(2, 3, 4), None, "cosine")
    assert set(METRIC_HELP) == set(METRICS)


def test_topk():
    row = torch.tensor([0.1, 0.9, 0.5, 0.9, float("nan")])
    idx, val = topk(row, 3)
    assert idx.tolist() == [1, 3, 2]  # ties keep the lower index first
    assert val.tolist() == pytest.approx([0.9, 0.9, 0.5])
    idx, _ = topk(row, 2, exclude=1)
    assert idx.tolist() == [3, 2]
    idx, _ = topk(row, 10, exclude=[1, 3])
    assert idx.tolist()[:2] == [2, 0] and idx.tolist()[-1] == 4  # NaN last, k clamped
    for bad in (0, -1, 1.5):
        with pytest.raises(ComposerError, match="--top-k must be a whole number >= 1"):
            topk(row, bad)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ComposerError, match="equal lengths"):
        spearman([1, 2], [1, 2, 3])


# --- ON ------------------------------------------------------------------------------


def _masks(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_on_overlap_hand_made_masks():
    a = _masks([[[1, 1, 0, 0], [1, 0, 0, 0]]])  # [N=1, L=2, F=4]
    b = _masks([[[1, 0, 1, 0], [1, 0, 0, 0]]])
    # layer 0: |a AND b| = 1, |a| = |b| = 2 -> cosine 1/2, jaccard 1/3; layer 1: identical -> 1
    assert on_similarity(a, b).item() == pytest.approx(0.75)
    assert on_similarity(a, b, layers=slice(0, 1)).item() == pytest.approx(0.5)
    assert on_similarity(a, b, layers=slice(1, None)).item() == pytest.approx(1.0)
    assert on_similarity(a, b, measure="jaccard").item() == pytest.approx((1 / 3 + 1) / 2)
    # through pairwise, and all pairs at once
    both = torch.cat([a, b])
    s = pairwise(both, None, "on")
    assert torch.allclose(s, torch.tensor([[1.0, 0.75], [0.75, 1.0]]))


def test_on_equals_per_pair_cosine_of_binary_vectors():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 16, generator=g) > 0.5
    b = torch.rand(5, 3, 16, generator=g) > 0.5
    s = on_similarity(a, b)
    for i in range(4):
        for j in range(5):
            per_layer = [F.cosine_similarity(a[i, k].float(), b[j, k].float(), dim=0) for k in range(3)]
            assert s[i, j].item() == pytest.approx(torch.stack(per_layer).mean().item(), abs=1e-6)


def test_on_empty_layer_scores_zero_and_errors():
    a = _masks([[[0, 0], [1, 1]]])
    b = _masks([[[1, 0], [1, 1]]])
    assert on_similarity(a, b).item() == pytest.approx(0.5)  # layer 0: a activates nothing -> 0
    with pytest.raises(ComposerError, match="not the prompts themselves"):
        pairwise(torch.randn(2, 3, 4), None, "on")
    with pytest.raises(ComposerError, match=r"differ in shape: \[L, F\] = \[2, 2\]"):
        on_similarity(a, _masks([[[1, 0, 1]]]))
    with pytest.raises(ComposerError, match="selects none"):
        on_similarity(a, b, layers=slice(5, 6))


def test_capture_ffn_activations_on_a_tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
    ).eval()
    ids = torch.randint(0, 100, (3, 7))

    masks = sim.capture_ffn_activations(model, lambda: model(input_ids=ids))
    assert masks.shape == (2, 32) and masks.dtype == torch.bool
    assert 0 < masks.sum() < masks.numel()

    # the same thing by hand: fraction of tokens where the post-GELU output is > 0, above one half
    seen = []
    handles = [
        model.encoder.layer[i].intermediate.register_forward_hook(lambda m, i, o: seen.append(o))
        for i in range(2)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    expected = torch.stack([(o > 0).float().mean(dim=(0, 1)) > 0.5 for o in seen])
    assert torch.equal(masks, expected)
    # hooks are gone, and a narrower window / threshold works
    assert all(not layer.intermediate._forward_hooks for layer in model.encoder.layer)
    one = sim.capture_ffn_activations(
        model, lambda: model(input_ids=ids), layer_pattern="*.layer.1.intermediate"
    )
    assert torch.equal(one[0], masks[1])
    loose = sim.capture_ffn_activations(model, lambda: model(input_ids=ids), threshold=0.0)
    assert (loose | ~masks).all()  # any neuron active on > half the tokens is active on some token
    with pytest.raises(ComposerError, match="no FFN activation modules"):
        sim.capture_ffn_activations(model, lambda: None, layer_pattern="*.nothing")
    with pytest.raises(ComposerError, match="did not reach"):
        sim.capture_ffn_activations(model, lambda: None)
