"""Composition math on hand-made tensors: no model anywhere."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from composer.errors import ComposeError
from composer.mixing import (
    AttentionComposer,
    LinearResult,
    average,
    best,
    check_candidates,
    combine,
    concat,
    optimize_linear,
    pick_best,
)

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


# --- candidates -------------------------------------------------------------------


def test_check_candidates_stacks_a_list(cands):
    assert torch.equal(check_candidates(list(cands)), cands)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(5, 8)],
         r"differ in prompt length P: #0 is \[4, 8\] but #2 is \[5, 8\]"),
        ([torch.zeros(4, 8), torch.zeros(4, 6)],
         r"differ in hidden size H: #0 is \[4, 8\] but #1 is \[4, 6\]"),
        ([], r"no candidate prompts \(K == 0\)"),
        (torch.zeros(0, 4, 8), r"no candidate prompts \(K == 0\)"),
        (torch.zeros(4, 8), r"must be a \[K, P, H\] tensor, got shape \[4, 8\]"),
        ([torch.zeros(4, 8), torch.zeros(2, 4, 8)],
         r"candidate #1 must be a \[P, H\] tensor, got \[2, 4, 8\]"),
    ],
)
def test_check_candidates_errors(bad, match):
    with pytest.raises(ComposeError, match=match):
        check_candidates(bad)


def test_check_candidates_names_the_candidates():
    with pytest.raises(ComposeError, match=r"'polarity' \(#0\) is \[4, 8\] but 'topic' \(#1\) is \[4, 6\]"):
        check_candidates([torch.zeros(4, 8), torch.zeros(4, 6)], names=["polarity", "topic"])
    with pytest.raises(ComposeError, match="got 1 names for 2 candidate prompts"):
        check_candidates([torch.zeros(4, 8)] * 2, names=["a"])


# --- best ---------------------------------------------------------------------------


def test_best_and_pick_best(cands):
    assert best([0.1, 0.7, 0.3]) == 1
    assert best([float("nan"), 0.2, 0.2]) == 1  # NaN never wins, ties go first
    idx, scores = pick_best(cands, lambda c: float(c.sum()))
    assert idx == int(cands.sum(dim=(1, 2)).argmax())
    assert scores == pytest.approx(cands.sum(dim=(1, 2)).tolist())


def test_best_errors():
    with pytest.raises(ComposeError, match="no scores to pick from"):
        best([])
    with pytest.raises(ComposeError, match="every candidate scored NaN"):
        best([float("nan")] * 2)


# --- average --------------------------------------------------------------------------


@pytest.mark.parametrize("normalise", ["softmax", "sum"])
def test_average_weights_sum_to_one(cands, normalise):
    prompt, w = average(cands, [0.2, 0.5, 0.9], temperature=0.5, normalise=normalise)
    assert prompt.shape == (P, H)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(prompt, torch.einsum("k,kph->ph", w, cands), atol=1e-6)


def test_average_of_identical_prompts_is_that_prompt(cands):
    same = cands[0].expand(K, P, H)
    for weights in (None, [0.1, 5.0, -2.0]):
        prompt, _ = average(same, weights)
        assert torch.allclose(prompt, cands[0], atol=1e-6)


def test_average_uniform_and_sum_normalisation(cands):
    prompt, w = average(cands)
    assert torch.allclose(w, torch.full((K,), 1 / K))
    assert torch.allclose(prompt, cands.mean(0), atol=1e-6)
    _, w = average(cands, [1.0, 3.0, 0.0], normalise="sum")
    assert w.tolist() == pytest.approx([0.25, 0.75, 0.0])


def test_average_sum_clips_negative_weights(cands, caplog):
    _, w = average(cands, [-1.0, 1.0, 3.0], normalise="sum")
    assert w.tolist() == pytest.approx([0.0, 0.25, 0.75])
    assert "clipping negative weights" in caplog.text


def test_average_temperature(cands):
    sims = [0.1, 0.9, 0.4]
    _, hot = average(cands, sims, temperature=1e4)
    assert torch.allclose(hot, torch.full((K,), 1 / K), atol=1e-4)
    prompt, cold = average(cands, sims, temperature=1e-3)
    assert torch.allclose(cold, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(prompt, cands[1], atol=1e-5)


def test_average_errors(cands):
    with pytest.raises(ComposeError, match=r"temperature must be a finite number > 0, got 0"):
        average(cands, [1.0, 2.0, 3.0], temperature=0)
    with pytest.raises(ComposeError, match=r"temperature must be a finite number > 0, got -1.0"):
        average(cands, temperature=-1.0)
    with pytest.raises(ComposeError, match=r"weights must be \[K\] = \[3\], got shape \[2\]"):
        average(cands, [1.0, 2.0])
    with pytest.raises(ComposeError, match="weights must be finite"):
        average(cands, [1.0, float("nan"), 2.0])
    with pytest.raises(ComposeError, match="normalise must be 'softmax' or 'sum', got 'max'"):
        average(cands, normalise="max")
    with pytest.raises(ComposeError, match="weights sum to 0 after clipping negatives"):
        average(cands, [-1.0, 0.0, -2.0], normalise="sum")


# --- concat ----------------------------------------------------------------------------


def test_concat_length_and_order():
    a, b, c = torch.full((2, H), 1.0), torch.full((3, H), 2.0), torch.full((1, H), 3.0)
    out = concat([a, b, c])
    assert out.shape == (6, H)
    assert out[:, 0].tolist() == [1, 1, 2, 2, 2, 3]


def test_concat_errors():
    with pytest.raises(ComposeError, match=r"different hidden sizes H: #0 \[2, 8\], #1 \[3, 6\]"):
        concat([torch.zeros(2, 8), torch.zeros(3, 6)])
    with pytest.raises(ComposeError, match=r"no prompts to concatenate \(K == 0\)"):
        concat([])
    with pytest.raises(ComposeError, match=r"prompt #0 must be a \[P, H\] tensor, got \[8\]"):
        concat([torch.zeros(8)])


# --- linear ------------------------------------------------------------------------------


def test_combine_math(cands):
    w = [0.5, -1.0, 2.0]
    expected = 0.5 * cands[0] - 1.0 * cands[1] + 2.0 * cands[2]
    assert torch.allclose(combine(w, cands), expected, atol=1e-6)
    assert torch.allclose(combine(np.array(w), cands), expected, atol=1e-6)
    wt = torch.tensor(w, requires_grad=True)
    combine(wt, cands).sum().backward()
    assert torch.allclose(wt.grad, cands.sum(dim=(1, 2)), atol=1e-5)
    with pytest.raises(ComposeError, match=r"weights must be \[K\] = \[3\], got shape \[4\]"):
        combine([1.0] * 4, cands)


def mse_to(target):
    return lambda prompt: ((prompt - target) ** 2).mean()


@pytest.mark.parametrize(
    "method, l1", [("lbfgs", 0.0), ("lbfgs", 1e-5), ("powell", 0.0), ("nelder-mead", 0.0)]
)
def test_optimize_linear_recovers_known_weights(cands, method, l1):
    target = 0.7 * cands[0] + 0.3 * cands[2]
    res = optimize_linear(cands, mse_to(target), method=method, l1=l1, max_iter=500, max_evals=3000)
    assert isinstance(res, LinearResult)
    assert res.weights == pytest.approx([0.7, 0.0, 0.3], abs=2e-2)
    assert res.loss < 1e-4
    assert res.objective == pytest.approx(res.loss + l1 * np.abs(res.weights).sum())
    assert res.n_evals == len(res.history) > 0
    assert min(res.history) == pytest.approx(res.objective)
    assert res.method == method
    assert res.to_dict()["weights"] == pytest.approx(res.weights.tolist())


def test_optimize_linear_respects_bounds(cands):
    target = 3.0 * cands[1]
    for method in ("lbfgs", "powell", "nelder-mead"):
        res = optimize_linear(cands, mse_to(target), method=method, l1=0.0, bounds=(-1.0, 1.0))
        assert np.all(res.weights <= 1.0 + 1e-9) and np.all(res.weights >= -1.0 - 1e-9)
        assert res.weights[1] == pytest.approx(1.0, abs=2e-2)


def test_optimize_linear_l1_shrinks_weights(cands):
    target = 0.7 * cands[0] + 0.3 * cands[2]
    free = optimize_linear(cands, mse_to(target), l1=0.0)
    sparse = optimize_linear(cands, mse_to(target), l1=0.5)
    assert np.abs(sparse.weights).sum() < np.abs(free.weights).sum()


def test_optimize_linear_nan_keeps_best_and_reports(cands):
    target = 0.7 * cands[0] + 0.3 * cands[2]
    calls = {"n": 0}

    def flaky(prompt):
        calls["n"] += 1
        loss = ((prompt - target) ** 2).mean()
        return loss * float("nan") if calls["n"] > 3 else loss

    for method in ("lbfgs", "powell", "nelder-mead"):
        calls["n"] = 0
        res = optimize_linear(cands, flaky, method=method, max_iter=20)
        assert res.converged is False
        assert math.isfinite(res.loss) and res.weights.shape == (K,)
        assert res.objective == pytest.approx(min(res.history))
        assert math.inf in res.history  # NaN shown to the optimizer as +inf


def test_optimize_linear_exception_keeps_best(cands):
    target = 0.7 * cands[0] + 0.3 * cands[2]
    calls = {"n": 0}
    seen = []

    def dies(prompt):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("out of memory")
        loss = ((prompt - target) ** 2).mean()
        seen.append(float(loss))
        return loss

    res = optimize_linear(cands, dies, method="powell", l1=0.0)
    assert res.converged is False
    assert "RuntimeError: out of memory" in res.message
    assert res.loss == pytest.approx(min(seen))
    assert res.n_evals == 5


def test_optimize_linear_not_converged_within_budget(cands):
    target = 0.7 * cands[0] + 0.3 * cands[2]
    res = optimize_linear(cands, mse_to(target), method="nelder-mead", max_iter=2)
    assert res.converged is False
    assert res.message
    assert res.objective == pytest.approx(min(res.history))


def test_optimize_linear_seeds_each_evaluation(cands):
    # a loss with dropout is the same function at every call, so the optimizer sees a
    # deterministic objective; the caller's RNG state is left as it was
    def noisy(prompt):
        return (torch.nn.functional.dropout(prompt, 0.5) ** 2).mean()

    kwargs = dict(method="powell", max_iter=1, init=[0.2, 0.2, 0.2], l1=0.0)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    res = optimize_linear(cands, noisy, seed=7, **kwargs)
    assert torch.equal(torch.rand(1), expected_next)
    torch.manual_seed(999)
    assert optimize_linear(cands, noisy, seed=7, **kwargs).history == res.history
    unseeded = [optimize_linear(cands, noisy, seed=None, **kwargs).history for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_optimize_linear_errors(cands):
    loss = mse_to(cands[0])
    with pytest.raises(ComposeError, match=r"method must be one of .* got 'adam'"):
        optimize_linear(cands, loss, method="adam")
    with pytest.raises(ComposeError, match=r"with low < high, got \(1.0, -1.0\)"):
        optimize_linear(cands, loss, bounds=(1.0, -1.0))
    with pytest.raises(ComposeError, match=r"l1 must be a finite number >= 0, got -0.1"):
        optimize_linear(cands, loss, l1=-0.1)
    with pytest.raises(ComposeError, match=r"init must be \[K\] = \[3\], got shape \[2\]"):
        optimize_linear(cands, loss, init=[0.5, 0.5])
    with pytest.raises(ComposeError, match="max_iter must be >= 1, got 0"):
        optimize_linear(cands, loss, max_iter=0)
    with pytest.raises(ComposeError, match="loss_fn must return a scalar tensor computed from its prompt"):
        optimize_linear(cands, lambda p: 1.0, method="lbfgs")
    with pytest.raises(ComposeError, match=r"loss_fn must return a scalar, got shape \[4\]"):
        optimize_linear(cands, lambda p: p.sum(dim=1), method="powell")
    with pytest.raises(ComposeError, match="found no finite loss in"):
        optimize_linear(cands, lambda p: float("nan"), method="powell", max_iter=2)
    with pytest.raises(ComposeError, match=r"no candidate prompts \(K == 0\)"):
        optimize_linear([], loss)


def test_optimize_linear_black_box_float_loss(cands):
    target = (0.7 * cands[0] + 0.3 * cands[2]).numpy()
    res = optimize_linear(cands, lambda p: float(((p.numpy() - target) ** 2).mean()),
                          method="powell", l1=0.0)
    assert res.weights == pytest.approx([0.7, 0.0, 0.3], abs=2e-2)


# --- attention (ATTEMPT) -------------------------------------------------------------------


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
