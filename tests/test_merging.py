"""Prompt merging: task vectors, arithmetic, TIES, DARE as pure functions, and the compose strategies
arithmetic and ties on a tiny BERT (both prompt kinds), with the bad input the issue lists."""
from __future__ import annotations

import json

import pytest
import torch

from composer import merging as M
from composer.compose import ComposeConfig, compose
from composer.errors import ComposeError
from composer.library import Library

from .test_compose import graph_yaml


# -- the pure functions, on tensors small enough to check by hand ---------------------------------------------
def test_task_vector_is_the_difference_and_refuses_another_shape():
    p, i = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, 0.0], [1.0, -1.0]])
    assert torch.equal(M.task_vector(p, i), torch.tensor([[0.5, 2.0], [2.0, 5.0]]))
    with pytest.raises(M.MergeError, match=r"prompt \[2, 2\], init \[3, 2\]"):
        M.task_vector(p, torch.zeros(3, 2))
    with pytest.raises(M.MergeError, match=r"prompt \[P, H\] or a prefix \[L, 2, P, D\], got \[4\]"):
        M.task_vector(torch.zeros(4), torch.zeros(4))


def test_trim_keeps_the_largest_fraction_of_each_matrix():
    v = torch.tensor([[1.0, -5.0], [3.0, 0.5]])
    assert torch.equal(M.trim(v, 0.5), torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(M.trim(v, 0.3), M.trim(v, 0.5))  # ceil(0.3 * 4) = 2 entries kept
    assert torch.equal(M.trim(v, 0.01), torch.tensor([[0.0, -5.0], [0.0, 0.0]]))  # never none
    assert torch.equal(M.trim(v, 1.0), v)
    # a prefix [L, 2, P, D] is trimmed per layer's keys and per layer's values, not across the whole stack
    prefix = torch.stack([v, v * 100]).reshape(1, 2, 2, 2)
    kept = M.trim(prefix, 0.25)  # one entry of each [P, D] matrix
    assert torch.equal(kept[0, 0], torch.tensor([[0.0, -5.0], [0.0, 0.0]]))
    assert torch.equal(kept[0, 1], torch.tensor([[0.0, -500.0], [0.0, 0.0]]))


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_a_trim_fraction_outside_0_1_is_refused(density):
    with pytest.raises(M.MergeError, match=r"fraction of each task vector's entries kept, in \(0, 1\]"):
        M.trim(torch.ones(2, 2), density)
    with pytest.raises(M.MergeError, match=r"in \(0, 1\]"):
        M.ties([torch.ones(2, 2)], density=density)


def test_sign_election_and_disjoint_mean_by_hand():
    a = torch.tensor([[2.0, -1.0, 0.0]])
    b = torch.tensor([[-1.0, -3.0, 0.0]])
    c = torch.tensor([[4.0, 2.0, 0.0]])
    stack = torch.stack([a, b, c])  # [K=3, 1, 3]
    sign = M.elect_sign(stack)
    assert torch.equal(sign, torch.tensor([[1.0, -1.0, 1.0]]))  # sums 5, -2, 0 (a zero sum elects +)
    # entry 0: a and c agree -> (2 + 4) / 2; entry 1: a and b -> (-1 - 3) / 2; entry 2: nobody is nonzero -> 0
    assert torch.equal(M.disjoint_mean(stack, None, sign), torch.tensor([[3.0, -2.0, 0.0]]))
    # weights: |w|-weighted mean of the agreeing entries; c weighs 3, so entry 0 is (2*1 + 4*3) / (1 + 3)
    w = [1.0, 1.0, 3.0]
    sign_w = M.elect_sign(stack, w)
    assert torch.equal(sign_w, torch.tensor([[1.0, 1.0, 1.0]]))  # entry 1: -1 - 3 + 6 = 2 > 0: c wins now
    assert torch.equal(M.disjoint_mean(stack, w, sign_w), torch.tensor([[14 / 4, 6 / 3, 0.0]]))


def test_ties_trims_elects_and_averages():
    a = torch.tensor([[3.0, 0.1, -2.0, 0.2]])
    b = torch.tensor([[1.0, -4.0, -1.0, 0.3]])
    # density 0.5 keeps 2 of 4: a -> [3, 0, -2, 0], b -> [0, -4, -1, 0]; signs +, -, -, + (zero sum);
    # means: 3 (a alone), -4 (b alone), (-2 - 1) / 2, 0 (nobody)
    assert torch.equal(M.ties([a, b], density=0.5), torch.tensor([[3.0, -4.0, -1.5, 0.0]]))
    # a negative weight subtracts: -b votes and counts with the opposite sign
    assert torch.equal(M.ties([a, b], [1.0, -1.0], density=0.5), torch.tensor([[3.0, 4.0, -2.0, 0.0]]))
    # one vector at density 1 comes back as it was; its weight's scale cancels in the mean
    assert torch.equal(M.ties([a], [5.0], density=1.0), a)


def test_arithmetic_adds_scaled_weighted_vectors_and_subtracts_negative_ones():
    base = torch.tensor([[1.0, 1.0]])
    v1, v2 = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, -1.0]])
    assert torch.equal(M.arithmetic(base, [v1, v2], [1.0, -2.0]), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(M.arithmetic(base, [v1, v2], [1.0, -2.0], scale=0.5), torch.tensor([[1.5, 2.0]]))
    # weights summing to 1 on one shared init: the weighted average of the prompts
    p1, p2 = base + v1, base + v2
    torch.testing.assert_close(M.arithmetic(base, [v1, v2], [0.25, 0.75]), 0.25 * p1 + 0.75 * p2)


def test_arithmetic_needs_a_base_of_the_vectors_shape():
    v = [torch.ones(2, 3)]
    with pytest.raises(M.MergeError, match="task arithmetic needs a base"):
        M.arithmetic(None, v)
    with pytest.raises(M.MergeError, match=r"the base is \[2, 4\] but the task vectors are \[2, 3\]"):
        M.arithmetic(torch.zeros(2, 4), v)
    with pytest.raises(M.MergeError, match=r"task vectors differ in shape: #0 is \[2, 3\] but #1 is \[3, 3\]"):
        M.arithmetic(torch.zeros(2, 3), [torch.ones(2, 3), torch.ones(3, 3)])
    with pytest.raises(M.MergeError, match=r"weights must be \[K\] = \[1\]"):
        M.arithmetic(torch.zeros(2, 3), v, [1.0, 2.0])
    with pytest.raises(M.MergeError, match="no task vectors"):
        M.ties([])


def test_dare_drops_and_rescales_and_keeps_the_expectation():
    x = torch.full((200, 100), 2.0)
    out = M.dare(x, 0.75, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 8.0}  # survivors rescaled by 1 / (1 - p)
    assert (out == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    assert out.mean().item() == pytest.approx(2.0, rel=0.05)
    assert torch.equal(out, M.dare(x, 0.75, torch.Generator().manual_seed(0)))  # seeded
    assert torch.equal(M.dare(x, 0.0), x)
    with pytest.raises(M.MergeError, match=r"must be in \[0, 1\)"):
        M.dare(x, 1.0)


def test_every_method_takes_a_prefix():
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(2, 2, 3, 4, generator=g) for _ in range(3)]
    base = torch.randn(2, 2, 3, 4, generator=g)
    assert M.arithmetic(base, vs, [1.0, -1.0, 0.5]).shape == (2, 2, 3, 4)
    t = M.ties(vs, [1.0, 1.0, 1.0], density=0.5, drop=0.3, generator=g)
    assert t.shape == (2, 2, 3, 4)
    assert M.dare(vs[0], 0.5, g).shape == (2, 2, 3, 4)


# -- the compose strategies on a tiny BERT ----------------------------------------------------------------
META = {"task": "toy", "family": "encoder", "head": "label-similarity"}


@pytest.fixture
def bb(tiny_bert_dir):
    from composer.backbones import load_backbone

    return load_backbone(str(tiny_bert_dir), device="cpu")


def save_tuned(lib: Library, bb, names, kind="prompt", seeds=None, length=4):
    """Entries as training leaves them: init (random, recorded seed) + a known delta. -> {name: (init, delta)}."""
    from composer.prompts import init_prompt

    g = torch.Generator().manual_seed(123)
    out = {}
    for i, name in enumerate(names):
        seed = 0 if seeds is None else seeds[i]
        init, prov = init_prompt("random", length, bb, seed=seed, kind=kind)
        delta = torch.randn(init.shape, generator=g) * 0.1
        meta = dict(META, backbone=bb.name, hidden_size=32, kind=kind, provenance=prov,
                    config={"init": "random", "seed": seed, "prompt_length": length, "kind": kind})
        lib.save(name, init + delta, meta)
        out[name] = (init, delta)
    return out


@pytest.fixture
def merge_setup(toy_task, bb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lib = Library()
    tuned = save_tuned(lib, bb, ["pos-p", "neg-p", "other-p"])
    return lib, tuned, tmp_path


def cc(g, **kw):
    return ComposeConfig(**(dict(graph=str(g), target="toy", shots=4, seed=0) | kw))


def test_arithmetic_is_the_shared_init_plus_the_weighted_task_vectors(merge_setup, bb, tmp_path):
    lib, tuned, _ = merge_setup
    g = graph_yaml(tmp_path, decomposition="toy: [pos, {task: neg, weight: -1}]")  # subtract neg's skill
    r = compose(cc(g, strategy="arithmetic", save="toy-ar", out_graph=str(tmp_path / "out.json")), library=lib,
                backbone=bb)
    init = tuned["pos-p"][0]
    assert all(torch.equal(i, init) for i, _ in tuned.values())  # one seed: one shared init
    want = init + tuned["pos-p"][1] - tuned["neg-p"][1] + 0.5 * tuned["other-p"][1]  # other: its similarity 0.5
    e = lib.load("toy-ar")
    torch.testing.assert_close(e.prompt, want)
    prov = e.meta["provenance"]
    assert prov["strategy"] == "arithmetic" and prov["candidates"] == ["pos", "neg", "other"]
    assert prov["weights"] == r["weights"] == [1.0, -1.0, 0.5]
    assert prov["base"] == "init" and prov["inits"]["neg-p"] == {"init": "random", "seed": 0}
    assert prov["density"] == 1.0 and prov["scale"] == 1.0 and prov["dare"] == 0.0
    edges = [d for d in json.loads((tmp_path / "out.json").read_text())["edges"] if "composed:arithmetic" in d]
    assert sorted(d["composed:arithmetic"] for d in edges) == [-1.0, 0.5, 1.0]
    # the scale multiplies the merged vector; weights summing to 1 on the shared init give the average
    half = compose(cc(g, strategy="arithmetic", scale=0.5), library=lib, backbone=bb)
    assert half["scale"] == 0.5


def test_ties_composes_the_trimmed_sign_elected_mean(merge_setup, bb, tmp_path):
    lib, tuned, _ = merge_setup
    g = graph_yaml(tmp_path)
    compose(cc(g, strategy="ties", density=0.5, save="toy-ties"), library=lib, backbone=bb)
    init = tuned["pos-p"][0]
    deltas = [tuned[n][1] for n in ("pos-p", "neg-p", "other-p")]
    want = init + M.ties(deltas, [1.0, 1.0, 0.5], density=0.5)
    e = lib.load("toy-ties")
    torch.testing.assert_close(e.prompt, want)
    assert e.meta["provenance"]["density"] == 0.5 and e.meta["provenance"]["strategy"] == "ties"
    default = compose(cc(g, strategy="ties"), library=lib, backbone=bb)
    assert default["density"] == 0.2  # TIES' top-20%
    # DARE is seeded by --seed: the same seed, the same prompt
    a = compose(cc(g, strategy="ties", dare=0.5, save="d1"), library=lib, backbone=bb)
    compose(cc(g, strategy="ties", dare=0.5, save="d2"), library=lib, backbone=bb)
    assert a["dare"] == 0.5 and torch.equal(lib.load("d1").prompt, lib.load("d2").prompt)
    assert not torch.equal(lib.load("d1").prompt, lib.load("toy-ties").prompt)


def test_both_merges_compose_prefixes_from_different_inits(toy_task, bb, tmp_path, monkeypatch):
    from composer.model import from_library
    from composer.tasks import load_task

    monkeypatch.chdir(tmp_path)
    lib = Library()
    tuned = save_tuned(lib, bb, ["pos-p", "neg-p", "other-p"], kind="prefix", seeds=[0, 1, 2], length=3)
    g = graph_yaml(tmp_path)
    inits = torch.stack([tuned[n][0] for n in ("pos-p", "neg-p", "other-p")])
    deltas = [tuned[n][1] for n in ("pos-p", "neg-p", "other-p")]
    r = compose(cc(g, strategy="arithmetic", save="pa"), library=lib, backbone=bb)
    e = lib.load("pa")
    assert e.meta["kind"] == "prefix" and list(e.prompt.shape) == [2, 2, 3, 32] == r["shape"]
    assert e.meta["provenance"]["base"] == "mean of the inits"
    assert e.meta["provenance"]["inits"]["neg-p"] == {"init": "random", "seed": 1, "kind": "prefix"}
    torch.testing.assert_close(e.prompt, inits.mean(0) + deltas[0] + deltas[1] + 0.5 * deltas[2])
    compose(cc(g, strategy="ties", density=0.5, save="pt"), library=lib, backbone=bb)
    t = lib.load("pt")
    torch.testing.assert_close(t.prompt, inits.mean(0) + M.ties(deltas, [1.0, 1.0, 0.5], density=0.5))
    pm = from_library(t, bb, load_task("toy"))
    assert pm.kind == "prefix"


def test_a_base_entry_or_zeros_stands_in_for_the_inits(merge_setup, bb, tmp_path):
    lib, tuned, _ = merge_setup
    g = graph_yaml(tmp_path)
    prompts = [lib.load(n).prompt for n in ("pos-p", "neg-p", "other-p")]
    r = compose(cc(g, strategy="arithmetic", base="zeros", save="z"), library=lib, backbone=bb)
    torch.testing.assert_close(lib.load("z").prompt, prompts[0] + prompts[1] + 0.5 * prompts[2])
    assert r["base"] == "zeros" and "inits" not in r
    lib.save("anchor", torch.full((4, 32), 0.01), dict(META, backbone=bb.name))
    compose(cc(g, strategy="arithmetic", base="anchor", save="b"), library=lib, backbone=bb)
    anchor = torch.full((4, 32), 0.01)
    want = anchor + sum(w * (p - anchor) for w, p in zip([1.0, 1.0, 0.5], prompts))
    e = lib.load("b")
    torch.testing.assert_close(e.prompt, want)
    assert e.meta["provenance"]["base"] == "library:anchor" and e.meta["provenance"]["base_sha"]


def test_a_trained_entry_recovers_its_init(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    """The init the training drew is the one compose regenerates: a run whose best checkpoint is its init
    (lr tiny, so step 0 wins or nearly) has a task vector of about zero."""
    from composer.backbones import load_backbone
    from composer.prompts import init_prompt
    from composer.task_vectors import recover_init
    from composer.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    lib = Library()
    train(TrainConfig(task="toy", backbone=str(tiny_bert_dir), prompt_length=4, steps=2, eval_every=1, batch_size=8,
                      max_eval=20, seed=7, init="vocab", run_dir=str(tmp_path / "run"), save="v"),
          library=lib, progress=False)
    e = lib.load("v")
    bb = load_backbone(str(tiny_bert_dir), device="cpu")
    init, record = recover_init("v", e.prompt, e.meta, lib, lambda: bb)
    assert record == {"init": "vocab", "seed": 7}
    assert torch.equal(init, init_prompt("vocab", 4, bb, seed=7)[0])
    moved = (e.prompt - init).abs().max().item()
    assert moved < (e.prompt - init_prompt("vocab", 4, bb, seed=8)[0]).abs().max().item()  # its own, not another


def test_a_library_init_saved_again_since_is_refused_not_subtracted(toy_task, tiny_bert_dir, tmp_path, monkeypatch):
    """The provenance keeps the library init's content hash: a task vector against an init that was overwritten
    afterwards would be silently wrong, so it is refused in one line; the unchanged init is recovered exactly."""
    from composer.backbones import load_backbone
    from composer.task_vectors import recover_init
    from composer.train import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    lib = Library()
    bb = load_backbone(str(tiny_bert_dir), device="cpu")
    kw = dict(task="toy", backbone=str(tiny_bert_dir), prompt_length=4, steps=2, eval_every=1, batch_size=8,
              max_eval=20)
    train(TrainConfig(**kw, seed=1, run_dir=str(tmp_path / "a"), save="base-p"), library=lib, progress=False)
    train(TrainConfig(**kw, init="library:base-p", run_dir=str(tmp_path / "b"), save="child"), library=lib,
          progress=False)
    child = lib.load("child")
    assert child.meta["provenance"]["from_sha"] == lib.content_sha("base-p")
    init, record = recover_init("child", child.prompt, child.meta, lib, lambda: bb)
    assert torch.equal(init, lib.load("base-p").prompt) and record == {"init": "library", "from": "base-p"}
    base = lib.load("base-p")
    lib.save("base-p", base.prompt + 1.0, base.meta, overwrite=True)  # the init is trained again under its name
    with pytest.raises(ComposeError, match=r"^cannot recover the init of 'child' \(its init, library entry 'base-p', "
                                           r"was saved again after 'child' was trained from it"):
        recover_init("child", child.prompt, child.meta, lib, lambda: bb)


def test_an_init_that_cannot_be_recovered_says_how_to_give_the_base(merge_setup, bb, tmp_path):
    lib, _, _ = merge_setup
    g = graph_yaml(tmp_path)
    compose(cc(g, strategy="average", save="avg"), library=lib, backbone=bb)
    lib.save("other-p", lib.load("avg").prompt, lib.load("avg").meta)  # a composed prompt as a candidate
    before = lib.names()
    with pytest.raises(ComposeError, match=r"^cannot recover the init of 'other-p' \(it was composed with --strategy "
                                           r"average, not trained from an init\).*--base NAME .* or --base zeros"):
        compose(cc(g, strategy="ties", save="never"), library=lib, backbone=bb)
    lib.save("other-p", lib.load("avg").prompt, dict(META, backbone=bb.name))  # no provenance at all
    with pytest.raises(ComposeError, match=r"'other-p' \(its provenance records no init\)"):
        compose(cc(g, strategy="arithmetic"), library=lib, backbone=bb)
    lib.save("other-p", lib.load("avg").prompt, dict(META, backbone=bb.name, provenance={"init": "library",
                                                                                          "from": "gone"}))
    with pytest.raises(ComposeError, match=r"started from library entry 'gone', which is no longer in"):
        compose(cc(g, strategy="arithmetic"), library=lib, backbone=bb)
    assert lib.names() == before  # nothing saved, nothing lost
    assert compose(cc(g, strategy="arithmetic", base="zeros"), library=lib, backbone=bb)["base"] == "zeros"


def test_a_base_of_another_shape_or_kind_is_refused(merge_setup, bb, tmp_path):
    lib, _, _ = merge_setup
    g = graph_yaml(tmp_path)
    lib.save("long", torch.zeros(6, 32), dict(META, backbone=bb.name))
    with pytest.raises(ComposeError, match=r"--base long is a prompt of shape \[6, 32\] but the candidates are "
                                           r"prompts of shape \[4, 32\]"):
        compose(cc(g, strategy="arithmetic", base="long"), library=lib, backbone=bb)
    lib.save("pre", torch.zeros(2, 2, 4, 32), dict(META, backbone=bb.name, hidden_size=32, kind="prefix"))
    with pytest.raises(ComposeError, match=r"--base pre is a prefix of shape \[2, 2, 4, 32\] but the candidates "
                                           r"are prompts"):
        compose(cc(g, strategy="ties", base="pre"), library=lib, backbone=bb)
    with pytest.raises(ComposeError, match="--base library:nope: no prompt 'nope' in the library"):
        compose(cc(g, strategy="ties", base="library:nope"), library=lib, backbone=bb)


@pytest.mark.parametrize("kw,msg", [
    (dict(strategy="ties", density=0.0), r"--density \(the trim fraction.*must be in \(0, 1\], got 0.0"),
    (dict(strategy="ties", density=1.2), r"must be in \(0, 1\], got 1.2"),
    (dict(strategy="arithmetic", dare=1.0), r"--dare \(the drop probability\) must be in \[0, 1\)"),
    (dict(strategy="average", base="x"), "--base applies to --strategy arithmetic or ties, not average"),
    (dict(strategy="linear", density=0.5), "--density applies to --strategy arithmetic or ties"),
    (dict(strategy="ties", mix_temperature=2.0), "--temperature does not apply to --strategy ties"),
    (dict(strategy="arithmetic", scale=float("inf")), "--scale must be a finite number"),
    (dict(strategy="arithmetic", base="bad name"), "bad --base"),
])
def test_bad_merge_options_are_one_line(tmp_path, kw, msg):
    from composer.errors import ComposerError

    with pytest.raises(ComposerError, match=msg) as e:
        ComposeConfig(graph=str(tmp_path / "g.yaml"), target="toy", **kw)
    assert "\n" not in str(e.value)


def test_cli_merges_and_refuses_a_bad_trim_in_one_line(merge_setup, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    lib, _, _ = merge_setup
    g = graph_yaml(tmp_path)
    out = CliRunner().invoke(cli, ["compose", str(g), "--target", "toy", "--strategy", "ties", "--trim", "0.3",
                                   "--dare", "0.1", "--save", "cli-ties", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["density"] == 0.3 and r["dare"] == 0.1 and r["base"] == "init" and r["saved"] == "cli-ties"
    bad = CliRunner().invoke(cli, ["compose", str(g), "--target", "toy", "--strategy", "ties", "--density", "1.5"])
    assert bad.exit_code == 1 and "must be in (0, 1], got 1.5" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output


def test_merge_weights_keep_negative_priors_and_clip_negative_similarities():
    from composer.compose import Candidate
    from composer.task_vectors import merge_weights

    p = torch.zeros(1, 1)
    cands = [Candidate("a", "a-p", "part_of", None, p, {}), Candidate("b", "b-p", "part_of", -0.5, p, {}),
             Candidate("c", "c-p", "similar", -0.2, p, {}), Candidate("d", "d-p", "similar", 0.7, p, {})]
    assert merge_weights(cands) == [1.0, -0.5, 0.0, 0.7]
