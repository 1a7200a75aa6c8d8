"""bench/cuda_train.py: the GPU training table, run on the CPU as its smoke test."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("bench_cuda_train", ROOT / "bench" / "cuda_train.py")
    m = importlib.util.module_from_spec(spec)
    sys.modules["bench_cuda_train"] = m
    spec.loader.exec_module(m)
    return m


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu_unless_told(mod, capsys):
    with pytest.raises(SystemExit):
        mod.main(["--models", "minilm"])
    assert "no CUDA device here (--allow-cpu" in capsys.readouterr().err


def test_each_variant_trains_and_lands_in_the_table(mod, toy_task, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    mod.main(["--allow-cpu", "--models", str(tiny_bert_dir), "--task", str(toy_task), "--variants", "fp32,bf16-joint",
              "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--max-eval", "8", "--out-json", str(out)])
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["variant"], r["steps"]) for r in rows] == [("fp32", 2), ("bf16-joint", 2)]
    assert all(0 <= r["dev"] <= 1 and r["seconds"] > 0 for r in rows)
    assert doc["command"].startswith("python bench/cuda_train.py --allow-cpu")
    body = [line for line in table.splitlines() if line.startswith(f"| {tiny_bert_dir} |")]
    assert [line.split(" | ")[1] for line in body] == ["fp32", "bf16-joint"]
    if not torch.cuda.is_available():
        assert all(r["peak_mib"] is None for r in rows) and "CPU (no GPU" in table
