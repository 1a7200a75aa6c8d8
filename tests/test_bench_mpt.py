"""bench/mpt.py's PEFT peer: PEFT's MultitaskPromptEmbedding, initialised by PEFT from our exported MPT entry,
starts at the prompt our own target adaptation starts at (@mean, @TASK), and trains through our loop."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from composer.library import Library

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench_mpt():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_mpt", ROOT / "bench" / "mpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_mpt"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_peft_mpt_source_starts_where_ours_does_and_trains(bench_mpt, toy_task, tiny_bert_dir, tmp_path):
    from composer.backbones import load_backbone
    from composer.mpt import MPT_EXTRA, target_source
    from composer.peft_io import export_peft
    from composer.train import TrainConfig, prepare, train

    lib = Library(tmp_path / "lib")
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 32, generator=g)
    u, v = 1 + 0.3 * torch.randn(2, 4, 1, generator=g), 1 + 0.3 * torch.randn(2, 1, 32, generator=g)
    lib.save("m", shared, {"backbone": str(tiny_bert_dir), "family": "encoder", "task": None,
                           "provenance": {"shared": "mpt", "tasks": ["polarity", "topic"]}},
             extras={MPT_EXTRA: {"u": u, "v": v}})
    adapter = export_peft(lib, "m", tmp_path / "adapter")
    bb = load_backbone(str(tiny_bert_dir))
    emb = bb.network.get_input_embeddings()
    for init, task, pick in (("AVERAGE_SOURCE_TASKS", 0, "mean"), ("EXACT_SOURCE_TASK", 1, "topic")):
        theirs = bench_mpt.PeftMPTSource(adapter, init, emb, source_task=task)
        ours, _ = target_source(lib.load("m"), pick, "prompt")
        x = torch.zeros(3, 5, 32)
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-6, rtol=0)
        assert theirs.static().shape == (4, 32)

    tc = TrainConfig(task=str(toy_task), backbone=str(tiny_bert_dir), prompt_length=4, steps=3, batch_size=8,
                     lr=0.1, eval_every=3, max_eval=16, seed=0, run_dir=str(tmp_path / "run"))
    source = bench_mpt.PeftMPTSource(adapter, "AVERAGE_SOURCE_TASKS", emb)
    before = {n: p.detach().clone() for n, p in source.named_parameters()}
    r = train(tc, prepared=prepare(tc, backbone=bb, library=lib, prompt_source=source), library=lib, progress=False)
    assert r["steps"] == 3
    assert set(before) == {"encoder.embedding.weight", "encoder.prefix_task_cols", "encoder.prefix_task_rows"}
    from safetensors.torch import load_file

    last = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))  # the last step's state
    assert set(last) == {f"prompt_source.{n}" for n in before}  # only PEFT's module trains
    assert all(not torch.equal(before[n], last[f"prompt_source.{n}"]) for n in before)
