"""bench/generation_speed.py on a tiny decoder: the arms compute the same NLL and decode the same tokens."""
import json

from .test_bench_transfer import _bench_module
from .test_generation import write_copy_task


def test_generation_speed_bench_checks_its_arms_agree(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    for name in ("transfer", "step_overhead", "peft_arm"):  # its siblings, imported by name
        _bench_module(name, f"{name}.py")
    mod = _bench_module("bench_generation_speed", "generation_speed.py")
    monkeypatch.chdir(tmp_path)
    write_copy_task(tmp_path)
    out = tmp_path / "speed.json"
    mod.main(["--model", str(tiny_llama_dir), "--task", "copy", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "4", "--prompt-length", "3", "--repeats", "2", "--warmup", "1", "--gen-batch-size", "4",
              "--max-new-tokens", "4", "--gen-repeats", "2", "--tmp", str(tmp_path), "--out", str(out)])
    res = json.loads(out.read_text())
    t, d = res["train"], res["decode"]
    assert t["check"]["abs_diff"] < 1e-3 and len(t["arms"]) == 2 and t["ratio_a_over_b"] > 0
    assert d["same_tokens"]["a==c"] is True and "a==b" in d["same_tokens"]  # PEFT's generate: reported only
    assert d["arms"]["a"]["tokens"] == d["arms"]["c"]["tokens"] > 0
    assert "Tokens/s (a)/(c)" in capsys.readouterr().out
