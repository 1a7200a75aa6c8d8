"""End to end with the packaged backbones (no download): minilm learns a built-in task; smollm2's loss falls."""
from __future__ import annotations

import json

import pytest

from composer.library import Library
from composer.train import TrainConfig, train


def test_minilm_learns_negation(tmp_path):
    """Prompt tuning alone (the backbone frozen) lifts minilm from chance to well above it."""
    r = train(TrainConfig(task="negation", backbone="minilm", steps=60, batch_size=16, lr=0.3, eval_every=30,
                          max_eval=200, seed=0, save="negation-e2e", run_dir=str(tmp_path / "run")), progress=False)
    assert r["initial"]["score"] < 0.7
    assert r["dev"]["score"] >= 0.8, r
    assert r["test"]["score"] >= 0.8
    e = Library().load("negation-e2e")
    assert e.prompt.shape == (20, 384) and e.meta["backbone"] == "minilm" and e.meta["head"] == "label-similarity"


def test_smollm2_loss_falls(tmp_path):
    """A short verbalizer run on the decoder: the dev loss goes down."""
    r = train(TrainConfig(task="polarity", backbone="smollm2-135m", steps=12, batch_size=8, lr=0.1, eval_every=12,
                          max_eval=48, prompt_length=8, seed=0, run_dir=str(tmp_path / "run")), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval"]["loss"] for x in lines if "eval" in x]
    assert evals[-1] < evals[0], evals
    assert r["dev"]["loss"] < r["initial"]["loss"]


@pytest.mark.slow
def test_minilm_retrieval_finds_the_decomposition(tmp_path):
    """Prompts of polarity and negated-polarity sit nearer each other than either does to topic."""
    from composer.transfer import similarity_matrix

    for task in ("polarity", "negated-polarity", "topic"):
        train(TrainConfig(task=task, backbone="minilm", steps=150, eval_every=150, max_eval=200, seed=0,
                          save=f"{task}-r", run_dir=str(tmp_path / task)), progress=False)
    names = ["polarity-r", "negated-polarity-r", "topic-r"]
    hits = {}
    for metric in ("cos-avg", "cos-tok", "on"):
        m = similarity_matrix(Library(), names, metric)
        hits[metric] = bool(m[0, 1] > m[0, 2] and m[1, 0] > m[1, 2])
    assert any(hits.values()), hits
