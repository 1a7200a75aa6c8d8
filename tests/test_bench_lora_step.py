"""bench/lora_step.py on a tiny decoder: both arms train the same numbers and compute the same target NLL."""
import json

from .test_bench_transfer import _bench_module
from .test_generation import write_copy_task


def test_lora_step_bench_checks_its_arms_agree(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    for name in ("transfer", "step_overhead", "peft_arm", "generation_speed"):  # its siblings, imported by name
        _bench_module(name, f"{name}.py")
    mod = _bench_module("bench_lora_step", "lora_step.py")
    monkeypatch.chdir(tmp_path)
    write_copy_task(tmp_path)
    out = tmp_path / "lora.json"
    mod.main(["--model", str(tiny_llama_dir), "--task", "copy", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "4", "--prompt-length", "3", "--lora-r", "2", "--repeats", "2", "--warmup", "1",
              "--tmp", str(tmp_path), "--out", str(out)])
    res = json.loads(out.read_text())["result"]
    assert abs(res["check"]["ours_token_mean"] - res["check"]["peer_loss"]) < 1e-3
    assert res["lora"]["r"] == 2 and res["trainable"] > 3 * 32 and res["ratio_a_over_b"] > 0
    assert "PEFT LoRA + a prompt, by hand" in capsys.readouterr().out
