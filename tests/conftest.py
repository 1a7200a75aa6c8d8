"""Shared fixtures: tiny backbones built from configs (no download), a toy task on local files."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_library(tmp_path, monkeypatch):
    """Every test gets its own library folder; none touches the user's."""
    monkeypatch.setenv("PROMPT_COMPOSER_LIBRARY", str(tmp_path / "library"))


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's WordPiece tokenizer (from the packaged backbone), reused by every tiny model."""
    from transformers import AutoTokenizer

    from composer.backbones import alias_path

    return AutoTokenizer.from_pretrained(str(alias_path("minilm")))


def tiny_model(family: str, vocab_size: int = 30522, seed: int = 0):
    from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    torch.manual_seed(seed)
    if family == "encoder":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=256)
        return BertModel(cfg)
    if family == "decoder":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, eos_token_id=102, bos_token_id=101)
        return LlamaForCausalLM(cfg)
    cfg = T5Config(vocab_size=vocab_size, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
    return T5ForConditionalGeneration(cfg)


@pytest.fixture(params=["encoder", "decoder", "encoder-decoder"])
def family(request):
    return request.param


@pytest.fixture
def tiny_backbone(tokenizer, family):
    from composer.backbones import wrap

    return wrap(tiny_model(family), tokenizer, name=f"tiny-{family}", family=family)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    """A tiny BERT saved to disk: a backbone given by local path."""
    d = tmp_path_factory.mktemp("tiny-bert")
    tiny_model("encoder").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("decoder").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


GOOD = ["good", "great", "fine", "lovely", "superb", "nice"]
BAD = ["bad", "awful", "poor", "dull", "terrible", "nasty"]
THINGS = ["film", "meal", "book", "show", "game", "song", "hotel", "car"]


def write_toy_task(root: Path, name: str = "toy", n: int = 240, seed: int = 0) -> Path:
    """A two-class sentiment task on local csv files: root/tasks/NAME.yaml + root/data/toy/*.csv."""
    rng = random.Random(seed)
    data = root / "data" / "toy"
    data.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n), ("dev", n // 4), ("test", n // 4)):
        lines = ["text,label"]
        for i in range(size):
            y = i % 2
            w = rng.choice(GOOD if y else BAD)
            lines.append(f"the {rng.choice(THINGS)} was {w},{y}")
        (data / f"{split}.csv").write_text("\n".join(lines) + "\n")
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(f"""name: {name}
description: toy sentiment
data:
  source: files
  format: csv
  splits: {{train: toy/train.csv, dev: toy/dev.csv, test: toy/test.csv}}
inputs: [text]
template: "{{text}} It was"
label_field: label
labels: ["0", "1"]
label_words: [" bad", " good"]
label_descriptions: ["a negative opinion", "a positive opinion"]
metric: accuracy
max_length: 32
""")
    return tasks / f"{name}.yaml"


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    """The toy task's YAML path, with the data directory set."""
    path = write_toy_task(tmp_path)
    monkeypatch.setenv("PROMPT_COMPOSER_DATA", str(tmp_path / "data"))
    return path


def ctrl_c_at_step(monkeypatch, module, step: int):
    """Ctrl-C while step ``step`` is being prepared: ``module.shard`` (which the training loops call once per
    step for its batch) raises KeyboardInterrupt on its call for that step. Returns what puts the real one
    back, for the resume that follows."""
    real, calls = module.shard, {"n": 0}

    def shard(idx, rank, world):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt
        return real(idx, rank, world)

    monkeypatch.setattr(module, "shard", shard)
    return lambda: monkeypatch.setattr(module, "shard", real)
