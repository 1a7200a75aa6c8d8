"""Prompt merging against mixing: arithmetic and ties next to average and linear, on the same candidates.

The demo's setting (composer/demo.py): the subtask prompts of graphs/demo.yaml (polarity, negation, topic)
are trained on their full training data with the demo's budget (random init, so for one seed they share one
init, the base of their task vectors); each target is linked to its top-2 sources by zero-shot transfer;
then every strategy composes the target's prompt from the same candidates and weights. Each merge has a few
settings (arithmetic: --scale; ties: --density x --scale); the one kept is the best by zero-shot dev accuracy
(nothing is chosen on test). Every kept prompt, and a random init, is then tuned with the demo's few-shot
budget (the same steps, examples and seed for every arm), and its test accuracy reported.

    python bench/merging.py --seeds 0,1,2 --out-md runs/bench-merging/results.md

Runs, prompts and a results.json go to runs/bench-merging/ (its own library: nothing of the user's is touched).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composer import graph as G_  # noqa: E402
from composer.backbones import load_backbone  # noqa: E402
from composer.compose import compose  # noqa: E402
from composer.config import ComposeConfig, DemoConfig, TrainConfig  # noqa: E402
from composer.encoding import encode_split  # noqa: E402
from composer.evaluate import evaluate  # noqa: E402
from composer.library import Library  # noqa: E402
from composer.model import from_library  # noqa: E402
from composer.taskdata import load_splits  # noqa: E402
from composer.tasks import load_task  # noqa: E402
from composer.train import prepare, train  # noqa: E402
from composer.transfer import link_graph  # noqa: E402
from step_overhead import cpu_isa, cpu_label, cpu_model  # noqa: E402
from transfer import git_commit  # noqa: E402

# (strategy, settings) tried per merge; average and linear have the demo's one setting
GRID = {
    "average": [{}],
    "linear": [{}],
    "arithmetic": [{"scale": s} for s in (0.5, 1.0, 1.5)],
    "ties": [{"density": d, "scale": s} for d in (0.2, 0.5) for s in (1.0, 2.0)],
}


def zero_shot(lib: Library, name: str, spec, bb, encs: dict, splits=("dev",)) -> dict:
    """Accuracy of a library prompt, untrained, on the given encoded splits."""
    pm = from_library(lib.load(name), bb, spec)
    pm.eval()
    return {split: evaluate(pm, spec, encs[split])["score"] for split in splits}


def one_seed(seed: int, args, bb, lib: Library, out: Path) -> dict:
    d = DemoConfig(seed=seed)  # the demo's budget, unless the flags change it
    source_steps = args.source_steps or d.source_steps
    G = G_.load_graph("demo")
    for n in G.nodes:
        G.nodes[n]["prompt"] = f"{n}-s{seed}"
    for n in [n for n, a in G.nodes(data=True) if a.get("role") in ("source", "subtask")]:
        name = G.nodes[n]["prompt"]
        if lib.exists(name) and lib.meta(name)["config"]["steps"] == source_steps:
            continue
        run_dir = out / f"s{seed}" / "sources" / n
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short before it saved: start it again
        tc = TrainConfig(task=G.nodes[n].get("task") or n, backbone=args.model, prompt_length=d.prompt_length,
                         steps=source_steps, batch_size=d.batch_size, lr=d.lr, eval_every=max(1, source_steps // 3),
                         max_eval=d.max_eval, seed=seed, save=name, run_dir=str(run_dir))
        train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=False)
    link_graph(G, lib, metric="transfer", top_k=2, targets=list(d.targets), max_examples=d.max_eval, backbone=bb)
    graph = out / f"s{seed}" / "graph.json"
    G_.save_graph(G, graph)
    targets = {}
    for target in d.targets:
        spec = load_task(G.nodes[target].get("task") or target)
        splits = load_splits(spec, splits=["dev", "test"], k_shot=0, seed=seed)
        encs = {"dev": encode_split(spec, splits["dev"], bb.tokenizer).subset(d.max_eval, seed),  # train()'s dev
                "test": encode_split(spec, splits["test"], bb.tokenizer)}
        arms: dict = {}
        for strat, grid in GRID.items():
            tried = []
            for i, settings in enumerate(grid):
                name = f"{target}-{strat}{i}-s{seed}"
                cr = compose(ComposeConfig(graph=str(graph), target=target, strategy=strat, top_k=2,
                                           metric="transfer", shots=d.shots, seed=seed, backbone=args.model,
                                           save=name, **settings), library=lib, backbone=bb)
                zs = zero_shot(lib, name, spec, bb, encs)
                tried.append({"name": name, "settings": settings, "zero_shot": zs, "candidates": cr["candidates"],
                              "weights": cr["weights"]})
                print(f"s{seed} {target} {strat} {settings}: zero-shot dev {zs['dev']:.3f}", file=sys.stderr)
            arms[strat] = max(tried, key=lambda t: t["zero_shot"]["dev"])  # first of the best on dev
            arms[strat]["zero_shot"].update(zero_shot(lib, arms[strat]["name"], spec, bb, encs, ("test",)))
            arms[strat]["tried"] = [{"settings": t["settings"], "dev": t["zero_shot"]["dev"]} for t in tried]
        for arm, init in [("random", "random")] + [(s, f"library:{a['name']}") for s, a in arms.items()]:
            shutil.rmtree(out / f"s{seed}" / target / arm, ignore_errors=True)
            tc = TrainConfig(task=spec.name, backbone=args.model, prompt_length=d.prompt_length, init=init,
                             steps=args.target_steps or d.target_steps, batch_size=d.batch_size, lr=d.lr,
                             eval_every=d.eval_every, max_eval=d.max_eval, seed=seed, k_shot=d.k_shot,
                             run_dir=str(out / f"s{seed}" / target / arm))
            r = train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=False)
            arms.setdefault(arm, {}).update(initial=r["initial"]["score"], dev=r["best"], test=r["test"]["score"],
                                            best_step=r["best_step"])
            print(f"s{seed} {target} {arm} tuned: dev {r['best']:.3f} test {r['test']['score']:.3f}", file=sys.stderr)
        targets[target] = arms
    return targets


def table(results: dict) -> str:
    lines = ["| target | seed | arm | setting kept (by zero-shot dev) | zero-shot dev | zero-shot test | "
             "tuned dev | tuned test |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for seed, targets in results.items():
        for target, arms in targets.items():
            for arm, a in arms.items():
                zs = a.get("zero_shot") or {"dev": a["initial"], "test": None}
                st = ", ".join(f"{k} {v}" for k, v in (a.get("settings") or {}).items()) or "-"
                zt = "" if zs["test"] is None else f"{zs['test']:.3f}"
                lines.append(f"| {target} | {seed} | {arm} | {st} | {zs['dev']:.3f} | {zt} | {a['dev']:.3f} | "
                             f"{a['test']:.3f} |")
    return "\n".join(lines)


def means(results: dict) -> str:
    """Mean over seeds of each arm's zero-shot and tuned test accuracy, per target."""
    rows = {}
    for targets in results.values():
        for target, arms in targets.items():
            for arm, a in arms.items():
                r = rows.setdefault((target, arm), {"zs": [], "tuned": []})
                if a.get("zero_shot"):
                    r["zs"].append(a["zero_shot"]["test"])
                r["tuned"].append(a["test"])
    lines = ["| target | arm | zero-shot test (mean) | tuned test (mean) | seeds |", "|---|---|---:|---:|---:|"]
    for (target, arm), r in rows.items():
        zs = f"{sum(r['zs']) / len(r['zs']):.3f}" if r["zs"] else ""
        lines.append(f"| {target} | {arm} | {zs} | {sum(r['tuned']) / len(r['tuned']):.3f} | {len(r['tuned'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--source-steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--target-steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--out", default="runs/bench-merging")
    ap.add_argument("--out-md")
    args = ap.parse_args(argv)
    t0, commit = time.time(), git_commit()  # the code that runs is the code at the start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib = Library(out / "library")
    bb = load_backbone(args.model, device="cpu")
    d = DemoConfig()
    results: dict = {}
    for seed in [int(x) for x in args.seeds.split(",")]:  # written after every seed: a cut-short run keeps its seeds
        results[seed] = one_seed(seed, args, bb, lib, out)
        head = (f"Commit {commit}, {cpu_label(cpu_model(), cpu_isa())}, {os.cpu_count()} cores; backbone "
                f"{args.model} frozen; the demo's budget: subtask prompts {args.source_steps or d.source_steps} steps "
                f"on full data, targets tuned {args.target_steps or d.target_steps} steps on {d.k_shot} examples per "
                f"class; dev on {d.max_eval} examples, test on the whole split; seeds {sorted(results)}; "
                f"{time.time() - t0:.0f} s.")
        md = "\n\n".join([head, table(results), means(results)])
        (out / "results.json").write_text(json.dumps({"commit": commit, "results": results}, indent=2,
                                                     sort_keys=True))
        if args.out_md:
            Path(args.out_md).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
