"""bench/deep_forms.py: the hidden-state deep prompt starts at the prompt's own states and its vectors reach the
output; every form runs the same loop."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def forms():
    spec = importlib.util.spec_from_file_location("bench_deep_forms", ROOT / "bench" / "deep_forms.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_deep_forms"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_hidden_deep_prompt_starts_at_the_prompts_own_states_and_its_vectors_reach_the_output(forms, toy_task, tiny_bert_dir):
    from composer.backbones import load_backbone
    from composer.train import TrainConfig, prepare

    bb = load_backbone(str(tiny_bert_dir))
    from composer.model import freeze_backbone

    pm = prepare(TrainConfig(task=str(toy_task), backbone=str(tiny_bert_dir), prompt_length=4), backbone=bb).model.eval()
    freeze_backbone(pm)
    tok = bb.tokenizer
    empty = torch.tensor([[tok.cls_token_id, tok.sep_token_id]])
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2003, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        plain, plain_empty = pm(ids, mask), pm(empty, torch.ones_like(empty))
        deep = forms.HiddenDeep(pm, start=1 if pm.after_first else 0)
        L = len(forms.encoder_layers(pm.network))
        assert deep.weight.shape == (L - 1, 4, pm.prompt_source.weight.shape[1])
        # its init is the prompt's own states over the empty input: there the model is the plain prompt's
        torch.testing.assert_close(pm(empty, torch.ones_like(empty)), plain_empty, atol=1e-5, rtol=0)
        deep.weight.add_(torch.randn_like(deep.weight))
        assert (pm(ids, mask) - plain).abs().max() > 1e-3
        for h in deep.handles:
            h.remove()
        torch.testing.assert_close(pm(ids, mask), plain, atol=1e-5, rtol=0)


def test_every_form_trains_in_one_loop_and_reports_dev_only(forms, toy_task, tiny_bert_dir, tmp_path):
    res = forms.main(["--task", str(toy_task), "--model", str(tiny_bert_dir), "--steps", "2", "--eval-every", "1",
                      "--max-eval", "16", "--batch-size", "8", "--prompt-length", "4",
                      "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "r.json")])
    f = res["forms"]
    assert set(f) == {"kv", "hidden", "prompt"}
    H = 32  # the tiny BERT's
    assert f["hidden"]["trainable"] - f["prompt"]["trainable"] == (2 - 1) * 4 * H  # L-1 layers of [P, H]
    assert f["kv"]["trainable"] == 2 * 2 * 4 * H  # [L, 2, P, D]
    assert all(len(v["curve"]) == 3 and v["best"] >= v["initial"] for v in f.values())
    assert "test" not in str(sorted(k for v in f.values() for k in v))
