"""How large are the prompts? Per-token L2 norms of library prompts next to the backbone's own embeddings.

A BERT-style encoder (minilm) adds position and token-type embeddings to every input row and then
applies LayerNorm, so a prompt row's norm decides how much of that row is the prompt's own direction
and how much is position: a row 20x the size of a word embedding carries almost no position, a row
near zero is almost nothing but position. This prints, as one markdown table, the mean per-token norm of:
the word, position and token-type embeddings; a random and a vocabulary init (what bench/transfer.py's
random and vocab arms start from, seed 0); and every library prompt whose name matches a pattern.

    python bench/prompt_scale.py --library runs/bench-library \\
        --names '*-minilm-300' 'bench-*-minilm-random-100' 'bench-*-minilm-*-s0'

Reads prompts only (no training, no data); one backbone load.
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def row_norm(x: torch.Tensor) -> float:
    """Mean L2 norm of the rows of x [N, H]."""
    return float(x.detach().float().norm(dim=-1).mean())


def table(library, backbone, patterns: list[str], length: int = 20) -> list[str]:
    from composer.prompts import init_prompt

    lines = ["| what | mean per-token norm |", "|---|---:|"]
    emb = backbone.input_embeddings().weight
    lines.append(f"| word embeddings (all {emb.shape[0]}) | {row_norm(emb):.3f} |")
    inner = getattr(backbone.model, "embeddings", None)
    for part in ("position_embeddings", "token_type_embeddings"):
        if inner is not None and hasattr(inner, part):
            lines.append(f"| {part.replace('_', ' ')} | {row_norm(getattr(inner, part).weight):.3f} |")
    for init in ("random", "vocab"):
        prompt, _ = init_prompt(init, length, backbone, seed=0)
        lines.append(f"| {init} init (seed 0, {length} tokens) | {row_norm(prompt):.3f} |")
    for name in library.names():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            entry = library.load(name)
            if entry.meta.get("backbone") in (None, backbone.name):
                lines.append(f"| {name} | {row_norm(entry.prompt):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", default=str(ROOT / "runs" / "bench-library"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--names", nargs="+", default=["*"], help="shell patterns of library names")
    ap.add_argument("--length", type=int, default=20, help="prompt length of the random and vocab inits")
    args = ap.parse_args(argv)
    from composer.backbones import load_backbone
    from composer.library import Library

    print("\n".join(table(Library(args.library), load_backbone(args.model), args.names, args.length)))


if __name__ == "__main__":
    main()
