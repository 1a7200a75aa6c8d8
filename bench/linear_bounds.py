"""Does a box on linear's weights fix it for prefixes? The demo's linear arm with LoraHub's box and with w >= 0.

On the prefix demo, linear's few-shot fit on negated-polarity chose negative weights (-0.22 polarity, -0.75
negation) and ended below random (bench/RESULTS.md, "The demo on prefixes"). This runs the demo's own
pipeline (composer/demo.py: subtask prompts, the graph linked by zero-shot transfer, the same budget for every
arm) with the linear strategy only, and beside its arms one more: linear composed with the weights kept in
[--min-weight, 1.5] (default 0, non-negative), tuned with exactly the demo's arm settings. Per seed:

  random          the demo's random-init arm
  linear          the demo's linear arm (weights in [-1.5, 1.5], LoraHub's box; the default)
  linear-min{W}   linear with the weights in [W, 1.5]

The subtask prompts train once (seed 0) and are reused by every seed; the seed sets the target runs and the
composer's shots. Scores: the best dev checkpoint's test accuracy (the demo's). Nothing is chosen on test.

    python bench/linear_bounds.py --kind prefix --lr 0.03 --seeds 0,1,2 --out runs/linear-bounds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from composer.atomic import atomic_write_text  # noqa: E402
from composer.backbones import load_backbone  # noqa: E402
from composer.compose import compose  # noqa: E402
from composer.config import DemoConfig  # noqa: E402
from composer.demo import arm_config, compose_config, machine, run_demo  # noqa: E402
from composer.library import Library  # noqa: E402
from composer.train import prepare, train  # noqa: E402
from transfer import git_commit  # noqa: E402
from transfer_report import fmt, mean_sd  # noqa: E402


def run_seed(args, seed: int, lib: Library, bb) -> dict:
    cfg = DemoConfig(backbone=args.model, out=str(Path(args.out) / f"s{seed}"), targets=(args.target,),
                     strategies=("linear",), kind=args.kind, lr=args.lr, seed=seed)
    report = run_demo(cfg, library=lib, progress=False, echo=lambda m: print(f"[s{seed}] {m}", flush=True))
    arms = report["targets"][args.target]
    arm = f"linear-min{args.min_weight:g}"
    name = f"bounds-{args.target}-{arm}-{args.kind}-s{seed}"
    cr = compose(compose_config(cfg, Path(cfg.out) / "graph.json", args.target, "linear", name,
                                min_weight=args.min_weight), library=lib, backbone=bb)
    tc = arm_config(cfg, args.target, f"library:{name}", Path(cfg.out) / args.target / arm)
    r = train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=False)
    arms[arm] = {"compose": {"candidates": cr["candidates"], "weights": cr["weights"]},
                 "initial": r["initial"]["score"], "dev": r["best"], "test": (r.get("test") or {}).get("score"),
                 "best_step": r["best_step"]}
    for a, v in arms.items():
        w = (v.get("compose") or {}).get("weights")
        print(f"[s{seed}] {a:14s} dev {v['initial']:.3f} -> {v['dev']:.3f}  test {v['test']:.3f}"
              + (f"  weights {[round(x, 3) for x in w]}" if w else ""), flush=True)
    return arms


def markdown(res: dict) -> str:
    seeds = sorted(res["seeds"], key=int)
    arms = list(res["seeds"][seeds[0]])
    lines = [f"Command: `{res['command']}`", "",
             f"Commit {res['commit']}; {res['machine'].get('cpu', '')}; wall {res['seconds']:.0f} s.", "",
             "| arm | " + " | ".join(f"seed {s} test (dev 0 -> best; weights)" for s in seeds) + " | test mean ± sd |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for a in arms:
        cells, tests = [], []
        for s in seeds:
            v = res["seeds"][s][a]
            w = (v.get("compose") or {}).get("weights")
            ws = "; " + ", ".join(f"{x:+.2f}" for x in w) if w else ""
            cells.append(f"{v['test']:.3f} ({v['initial']:.3f} -> {v['dev']:.3f}{ws})")
            tests.append(v["test"])
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {fmt(*mean_sd(tests))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--target", default="negated-polarity")
    ap.add_argument("--kind", default="prefix", choices=("prompt", "prefix"))
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--min-weight", type=float, default=0.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--library", default=None, help="library of the subtask prompts (default OUT/library)")
    ap.add_argument("--out", default="runs/linear-bounds")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib = Library(args.library or out / "library")
    bb = load_backbone(args.model)
    t0 = time.time()
    path = out / "results.json"
    res = json.loads(path.read_text()) if path.exists() else {"seeds": {}}  # finished seeds are kept
    for seed in (int(s) for s in args.seeds.split(",")):
        if str(seed) in res["seeds"]:
            print(f"[s{seed}] finished earlier, read from {path}")
            continue
        res["seeds"][str(seed)] = run_seed(args, seed, lib, bb)
        atomic_write_text(path, json.dumps(res, indent=2))
    res.update(command="python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
               commit=git_commit(), machine=machine(), seconds=time.time() - t0)
    atomic_write_text(path, json.dumps(res, indent=2))
    md = markdown(res)
    atomic_write_text(out / "results.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
