"""bench/prompt_scale.py: the norms it prints are the prompts' own, for the entries the patterns pick."""

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_table_reports_each_matching_prompt_norm(tmp_path, tokenizer):
    from prompt_scale import table

    from composer.backbones import wrap
    from composer.library import Library
    from tests.conftest import tiny_model

    bb = wrap(tiny_model("encoder"), tokenizer, name="tiny-encoder", family="encoder")
    lib = Library(tmp_path / "lib")
    meta = {"task": "toy", "backbone": "tiny-encoder", "family": "encoder", "head": "label-similarity"}
    lib.save("big-300", torch.full((4, 32), 0.5), meta)  # every row: 0.5 * sqrt(32)
    lib.save("small-300", torch.zeros(4, 32), meta)
    lib.save("other-60", torch.ones(4, 32), meta)
    lib.save("elsewhere-300", torch.ones(4, 32), dict(meta, backbone="another"))  # another backbone: left out
    rows = dict(re.match(r"\| (.+?) \| ([-\d.]+) \|", line).groups() for line in table(lib, bb, ["*-300"])[2:])
    assert float(rows["big-300"]) == round(0.5 * 32 ** 0.5, 3) and float(rows["small-300"]) == 0.0
    assert "other-60" not in rows and "elsewhere-300" not in rows
    emb = bb.input_embeddings().weight.detach()
    assert abs(float(rows["word embeddings (all 30522)"]) - emb.norm(dim=-1).mean().item()) < 1e-3
    assert {"position embeddings", "token type embeddings", "random init (seed 0, 20 tokens)",
            "vocab init (seed 0, 20 tokens)"} <= set(rows)
