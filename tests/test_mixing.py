"""Composition math on hand-made tensors: no model anywhere."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from composer.errors import ComposeError
from composer.mixing import (
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


@pytest.mark.parametrize("method", ["lbfgs", "powell"])
def test_optimize_linear_reports_every_evaluation(cands, method):
    """on_eval (the progress bar's hook) sees each evaluation and the best objective so far."""
    target = 0.7 * cands[0] + 0.3 * cands[2]
    seen = []
    res = optimize_linear(cands, mse_to(target), method=method, on_eval=lambda n, best: seen.append((n, best)))
    assert [n for n, _ in seen] == list(range(1, res.n_evals + 1))
    bests = [b for _, b in seen]
    assert bests == sorted(bests, reverse=True) and bests[-1] == pytest.approx(res.objective)
    assert bests == pytest.approx(np.minimum.accumulate(res.history).tolist())


def test_not_converged_says_the_kept_weights_are_fine(cands, caplog):
    """A stop before convergence is explained, not reported as a fault: the best weights are kept either way."""
    target = 0.7 * cands[0] + 0.3 * cands[2]
    with caplog.at_level("WARNING", logger="composer.mixing"):
        res = optimize_linear(cands, mse_to(target), method="nelder-mead", max_iter=2)
    (rec,) = [r for r in caplog.records if r.name == "composer.mixing"]
    msg = rec.getMessage()
    assert res.message in msg and f"best of its {res.n_evals} evaluations" in msg and "fine to use" in msg


def test_abnormal_line_search_is_explained():
    from composer.mixing import _not_converged_note

    note = _not_converged_note("lbfgs", "ABNORMAL: ", 12, 0.5)
    assert "line search" in note and "L1 penalty" in note and "12 evaluations" in note
    assert "line search" not in _not_converged_note("powell", "Maximum number of iterations", 3, 0.5)
