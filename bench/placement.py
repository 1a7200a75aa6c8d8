"""Where an input-level prompt goes on a BERT-style encoder: after [CLS] (ours, the default) or before it (PEFT's).

Trains the same prompt (same seed, init, steps, batches) with `--prompt-position after-cls` and
`--prompt-position front` on each task and prints dev (the best checkpoint's, on the seeded dev subset used
for choosing it) and test scores side by side. Nothing is chosen on test.

    python bench/placement.py --tasks sst2,qnli,negation,topic --steps 300 --seeds 0 --out-md runs/placement.md

Runs go to runs/bench-placement/TASK-POSITION-sSEED (no library entries are written).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composer.config import POSITIONS, TrainConfig  # noqa: E402
from composer.train import train  # noqa: E402
from step_overhead import cpu_isa, cpu_label, cpu_model  # noqa: E402
from transfer import git_commit  # noqa: E402


def run(task: str, position: str, seed: int, args) -> dict:
    run_dir = Path(args.runs) / f"{task}-{position}-s{seed}"
    rec_file = run_dir / "record.json"
    cfg = TrainConfig(task=task, backbone=args.model, prompt_position=position, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, eval_every=args.eval_every, max_eval=args.max_eval,
                      max_test=args.max_test, seed=seed, data_dir=args.data_dir, run_dir=str(run_dir))
    if rec_file.exists():  # a finished run with the same settings is reused
        rec = json.loads(rec_file.read_text())
        if rec.get("config") == cfg.to_dict():
            return rec
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    r = train(cfg, progress=False)
    rec = {"task": task, "position": position, "seed": seed, "initial": r["initial"]["score"], "dev": r["best"],
           "test": (r.get("test") or {}).get("score"), "metric": r["metric"], "seconds": r["seconds"],
           "config": cfg.to_dict()}
    rec_file.write_text(json.dumps(rec, indent=2, sort_keys=True))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="sst2,qnli,negation,topic")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-eval", type=int, default=500)
    ap.add_argument("--max-test", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-dir", default=os.environ.get("PROMPT_COMPOSER_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--runs", default="runs/bench-placement")
    ap.add_argument("--out-md")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0, commit = time.time(), git_commit()  # the code that runs is the code at the start
    rows = []
    for task in args.tasks.split(","):
        for seed in seeds:
            recs = {p: run(task, p, seed, args) for p in POSITIONS}
            rows.append((task, seed, recs))
            print(f"{task} seed {seed}: " + ", ".join(f"{p} dev {r['dev']:.3f} test {r['test']:.3f}"
                                                      for p, r in recs.items()), file=sys.stderr)
    lines = [f"Commit {commit}, {cpu_label(cpu_model(), cpu_isa())}, {os.cpu_count()} cores; backbone "
             f"{args.model} frozen, input-level prompt of 20 tokens, {args.steps} steps, batch {args.batch_size}, "
             f"lr {args.lr}, dev every {args.eval_every} on {args.max_eval} dev examples (the best checkpoint is "
             f"kept), test on at most {args.max_test}; {time.time() - t0:.0f} s.", "",
             "| task | seed | metric | dev at step 0 | after-cls dev | front dev | after-cls test | front test |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for task, seed, recs in rows:
        a, f = recs["after-cls"], recs["front"]
        lines.append(f"| {task} | {seed} | {a['metric']} | {a['initial']:.3f} / {f['initial']:.3f} | {a['dev']:.3f} | "
                     f"{f['dev']:.3f} | {a['test']:.3f} | {f['test']:.3f} |")
    md = "\n".join(lines)
    print(md)
    if args.out_md:
        Path(args.out_md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
