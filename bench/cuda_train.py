"""Real training runs on a GPU: fp32 vs bf16, activation checkpointing, joint mode, per backbone.

Each run is `prompt-composer train TASK --model M` through composer.train.train in this process (the CLI's
own code path), with the same steps, batch, evaluations and seed; what changes is one setting at a time:

  fp32        --mixed-precision no
  bf16        --mixed-precision bf16
  bf16-gc     --mixed-precision bf16 --gradient-checkpointing
  bf16-joint  --mixed-precision bf16 --mode joint (every backbone weight trains too)

Reported per run: wall seconds (training, its dev evaluations and the test evaluation), seconds per
step, peak GPU memory allocated, dev and test scores. Needs a CUDA device; `--allow-cpu` runs the same
code on a machine without one (every variant then trains in fp32 on the CPU: a smoke test of the script).

    python bench/cuda_train.py --models minilm,smollm2-135m --task sst2 --steps 300 --out-md runs/cuda.md
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402

VARIANTS = {
    "fp32": dict(mixed_precision="no"),
    "bf16": dict(mixed_precision="bf16"),
    "bf16-gc": dict(mixed_precision="bf16", gradient_checkpointing=True),
    "bf16-joint": dict(mixed_precision="bf16", mode="joint"),
}


def run_one(model: str, variant: str, args, run_dir: Path) -> dict:
    """One training run -> its row (seconds, s/step, peak MiB, dev, test)."""
    from composer.train import TrainConfig, train

    cfg = TrainConfig(task=args.task, backbone=model, steps=args.steps, batch_size=args.batch_size,
                      eval_every=args.eval_every, max_eval=args.max_eval, seed=args.seed, run_dir=str(run_dir),
                      data_dir=args.data_dir, **VARIANTS[variant])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = train(cfg, progress=False)  # its own Accelerator: CUDA and cfg.mixed_precision where there is a GPU
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"model": model, "variant": variant, "steps": r["steps"], "seconds": round(seconds, 2),
            "s_per_step": seconds / max(1, r["steps"]),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "dev": r["dev"]["score"], "test": (r.get("test") or {}).get("score"), "metric": r["metric"]}


def markdown(rows: list[dict], args, command: str, env: dict) -> str:
    def num(x, f):
        return "" if x is None else format(x, f)

    lines = [f"`{command}`", "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}. Task {args.task}, "
             f"{args.steps} steps of batch {args.batch_size}, dev every {args.eval_every} (at most "
             f"{args.max_eval} examples), the test split once at the end; seconds include all of it.", "",
             "| backbone | run | seconds | s/step | peak GPU memory | dev | test |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
        lines.append(f"| {r['model']} | {r['variant']} | {r['seconds']:.2f} | {r['s_per_step']:.4f} | {mem} | "
                     f"{num(r['dev'], '.3f')} | {num(r['test'], '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,smollm2-135m", help="comma-separated backbone aliases/paths")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="default: $PROMPT_COMPOSER_DATA, else ../shared/data")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (fp32 on the CPU: a smoke test)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}: use {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        ap.error("no CUDA device here (--allow-cpu runs the script on the CPU, in fp32, as a smoke test)")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    args.data_dir = args.data_dir or os.environ.get("PROMPT_COMPOSER_DATA") or (str(shared) if shared.is_dir()
                                                                                else None)
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if cuda else "CPU (no GPU: every run in fp32)"}
    command = "python bench/cuda_train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cuda-train-") as tmp:
        for model in [m for m in args.models.split(",") if m]:
            for v in variants:
                row = run_one(model, v, args, Path(tmp) / f"{len(rows)}")
                print(f"{model} {v}: {row['seconds']:.2f} s, dev {row['dev']:.3f}", file=sys.stderr, flush=True)
                rows.append(row)
    table = markdown(rows, args, command, env)
    print(table)
    if args.out_md:
        Path(args.out_md).write_text(table + "\n")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"command": command, "env": env, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
