"""bench/step_overhead.py --kind prefix on tiny backbones: the three arms run, agree and land in the report
(the shape of the output only; timings are not checked)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARM_KEYS = {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "times_ms", "loss_first", "loss_last", "saved_mib",
            "cpu_median_ms", "cpu_times_ms"}


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("bench_step_overhead", ROOT / "bench" / "step_overhead.py")
    m = importlib.util.module_from_spec(spec)
    sys.modules["bench_step_overhead"] = m
    spec.loader.exec_module(m)
    return m


def test_prefix_kind_runs_the_three_arms_and_reports_them(mod, tiny_bert_dir, tiny_llama_dir, tmp_path,
                                                          capsys):
    out = tmp_path / "overhead.json"
    mod.main(["--kind", "prefix", "--models", f"{tiny_bert_dir},{tiny_llama_dir}", "--batch-size", "2",
              "--seq-len", "8", "--prompt-length", "2", "--repeats", "2", "--warmup", "0", "--threads", "1",
              "--out", str(out)])
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["kind"] == "prefix"
    assert doc["command"].startswith("python bench/step_overhead.py --kind prefix")
    assert {"cpu", "cpu_isa", "torch", "peft"} <= set(doc["env"])
    enc, dec = doc["results"]
    # tiny BERT: 2 layers, 4 heads of 8 (D = 32); tiny Llama: 2 layers, 2 key/value heads of 8 (D = 16)
    assert (enc["family"], enc["prompt_shape"]) == ("encoder", [2, 2, 2, 32])
    assert (dec["family"], dec["prompt_shape"]) == ("decoder", [2, 2, 2, 16])
    for r in doc["results"]:
        assert r["kind"] == "prefix" and (r["B"], r["T"], r["P"], r["repeats"]) == (2, 8, 2, 2)
        assert set(r["arms"]) == {"a", "b", "c"}
        for s in r["arms"].values():
            assert ARM_KEYS <= set(s) and len(s["times_ms"]) == 2 and s["saved_mib"] > 0
        for ratios in ("ratio_of_medians", "median_paired_ratio", "cpu_median_paired_ratio", "saved_ratio"):
            assert set(r[ratios]) == {"a/b", "a/c"}, ratios
        c = r["checks"]  # the arms compute one function before timing (checked to 1e-4 in the script)
        assert abs(c["loss_a"] - c["loss_b"]) < 1e-3 and abs(c["loss_a"] - c["loss_c"]) < 1e-3
    assert "| (b) PEFT PrefixTuning |" in table and "peak memory is measured on a GPU only" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "[2, 2, 2," in line]
    assert [line.split(" | ")[1] for line in rows] == ["[2, 2, 2, 32]", "[2, 2, 2, 16]"]


def test_per_model_batch_sizes_must_match_the_models(mod):
    with pytest.raises(SystemExit, match="--batch-size '16,8,4': give one count, or one per model"):
        mod.main(["--kind", "prefix", "--models", "minilm,smollm2-135m", "--batch-size", "16,8,4"])
