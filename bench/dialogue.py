"""The dialogue benchmark: does a reply's prompt composed from its modules' prompts start ahead?

The founding example (graphs/dialogue.yaml): a task-oriented reply (woz-response: WOZ 2.0 history + state ->
the system's next reply) is made of modules that no one dataset annotates together (the intent, sgd-intent;
the state, woz-state; the wording, e2e-nlg). Each module's prompt is trained once on its own data (seed 0,
--module-steps, the whole train split); then the target tunes on a few of its own rows (--k-shot), every arm
for the same steps, batch, prompt learning rate and dev evaluations, the best dev checkpoint kept:

  random     prompt tuning from a random init (the baseline)
  vocab      prompt tuning from sampled vocabulary embeddings
  peft       PEFT's PromptTuning, trained by PEFT's own causal-LM loss from random's init (bench/peft_arm.py);
             its prompt is decoded by our generation on the same subsets (the two differ in training only;
             PEFT's generate is not used, see bench/generation_speed.py)
  best       the module prompt with the lowest target NLL on the shots, tuned on
  average    the module prompts averaged (the decomposition's prior weights, else equal)
  linear     weights fitted on the shots' target NLL (L-BFGS-B)
  attention  ATTEMPT: a per-example attention mixture over the module prompts, trained on with the target prompt
  concat     the module prompts joined, in the decomposition's order (3 x P virtual tokens)
  full       model tuning: every backbone weight trains (one random virtual token), --model-lr
  joint      prompt + model tuning from the composed init that scores best on dev before tuning

Reported: test BLEU and ROUGE-L (sacrebleu, rouge-score) of the kept checkpoint on a fixed test subset, the dev
BLEU before and after tuning, steps to reach random's best dev score, seconds per step, and a few test
generations of each arm (first seed). Nothing is chosen on test.

    python bench/dialogue.py                                   # woz-response on smollm2-135m, the defaults below
    python bench/dialogue.py --arms random,average,attention --seeds 0 --steps 40 --time-budget 30

A finished run (record.json in its run folder, keyed by its settings and its init prompt's content hash) is
read back instead of run again, so the benchmark runs piecewise: --time-budget MINUTES starts no new run
after that (exit 3; the same command goes on). Run folders live under --runs (default
runs/bench-dialogue); `python bench/records.py save --tier full --records bench/records/dialogue --runs runs/bench-dialogue
--sources sgd-intent,woz-state,e2e-nlg --targets woz-response --model smollm2-135m --source-steps 100` keeps the records
in git (bench/records/dialogue/; `restore` with the same --records/--runs brings them back). It uses bench/transfer.py's Bench (its records, tuning runs, module
prompts as "sources"); only the graph (the target's decomposition, no similarity linking) and the report are
its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from transfer import (BenchConfig, Bench, OutOfTime, arm_prompt_name, default_data_dir, git_commit,  # noqa: E402
                      say)

from composer.demo import steps_to_reach  # noqa: E402

ARMS = ("random", "vocab", "peft", "best", "average", "linear", "attention", "concat", "full", "joint")
COMPOSED = ("best", "average", "linear", "attention", "concat")
DEFAULTS = dict(tier="dialogue", model="smollm2-135m", arms=("random", "vocab", "peft", "average", "attention",
                                                              "concat", "full", "joint"),
                seeds=(0,), source_steps=100, steps=40, eval_every=10, source_max_eval=32, max_eval=32,
                max_test=100, batch_size=8, lr=0.3, model_lr=5e-5, prompt_length=20, full_prompt_length=1,
                shots=16, k_shot=32, library="runs/bench-library", runs="runs/bench-dialogue")


def module_graph(bench: Bench, graph_file: Path, target: str, modules: dict, out: Path) -> tuple[Path, list[str]]:
    """The target and its modules from ``graph_file``, each module's node naming the bench's prompt for it."""
    import yaml

    from composer import graph as G_
    from composer.graph_io import load_graph, save_graph

    G = load_graph(graph_file)
    subs = [s for s, _ in G_.subtasks(G, target)]
    missing = [s for s in subs if s not in modules]
    if missing:
        raise SystemExit(f"--modules lacks {', '.join(missing)}: the graph decomposes {target} into "
                         f"{', '.join(subs)}")
    data = yaml.safe_load(graph_file.read_text()) if graph_file.suffix in (".yaml", ".yml") else None
    priors = {}
    if data:  # the decomposition's prior weights, where the YAML gives them
        for s in (data.get("decomposition") or {}).get(target, []):
            if isinstance(s, dict):
                priors.update({k: v for k, v in s.items() if isinstance(v, (int, float))})
    nodes = [{"name": target, "role": "target", "task": G.nodes[target].get("task", target)}]
    nodes += [{"name": s, "role": "subtask", "task": G.nodes[s].get("task", s), "prompt": modules[s]["prompt"]}
              for s in subs]
    spec = {"name": f"bench-{target}", "backbone": bench.cfg.model, "nodes": nodes,
            "decomposition": {target: [{s: priors[s]} if s in priors else s for s in subs]}}
    path = save_graph(G_.from_dict(spec), out / "graph.json")
    return path, subs


def run(bench: Bench, target: str, graph_file: Path) -> dict:
    from composer.compose import ComposeConfig, compose
    from composer.errors import ComposeError

    cfg = bench.cfg
    modules = bench.train_sources()
    graph_path, subs = module_graph(bench, graph_file, target, modules, bench.runs / target)
    module_shas = {s: bench.entry_sha(f"library:{modules[s]['prompt']}") for s in subs}
    runs: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for seed in cfg.seeds:
        def add(arm: str, rec: dict):
            runs.setdefault(arm, []).append(rec)
            say(f"[{target}] seed {seed} {arm:<9} dev {rec['initial']:.2f} -> {rec['dev']:.2f}  test "
                f"{rec['test'] if rec['test'] is None else round(rec['test'], 2)}  ({rec['s_per_step']:.1f} s/step)")

        add("random", bench.tune(target, "random", seed, cfg.steps, f"random-s{seed}"))
        if "vocab" in cfg.arms:
            add("vocab", bench.tune(target, "vocab", seed, cfg.steps, f"vocab-s{seed}"))
        if "peft" in cfg.arms:
            from peft_arm import run_peft_generation

            add("peft", run_peft_generation(bench, target, seed, cfg.steps, f"peft-s{seed}"))
        composed = {}
        for arm in [a for a in COMPOSED if a in cfg.arms]:
            name = arm_prompt_name(target, bench.slug, arm, seed)
            ckey = bench.run_key(arm=arm, shots=cfg.shots, seed=seed, modules=module_shas)
            cpath = bench.runs / target / "compose" / f"{arm}-s{seed}.json"
            info = bench.stored(cpath, ckey) if bench.lib.exists(name) else None
            if info is None:
                bench.may_start(f"{target} {arm} composition, seed {seed}")
                t0 = time.time()
                try:
                    cr = compose(ComposeConfig(graph=str(graph_path), target=target, strategy=arm, shots=cfg.shots,
                                               seed=seed, backbone=cfg.model, data_dir=cfg.data_dir, save=name),
                                 library=bench.lib, backbone=bench.bb)
                except ComposeError as e:
                    skipped[arm] = str(e)
                    say(f"[{target}] {arm}: skipped ({e})")
                    continue
                info = bench.store(cpath, ckey, {"seed": seed, "candidates": cr["candidates"],
                                                 "weights": cr["weights"],
                                                 "compose_seconds": round(time.time() - t0, 2)})
            rec = dict(bench.tune(target, f"library:{name}", seed, cfg.steps, f"{arm}-s{seed}"),
                       candidates=info["candidates"], weights=info["weights"])
            composed[arm] = rec
            add(arm, rec)
        bench.full_and_joint(target, seed, composed, add, skipped)
    return {"modules": modules, "subtasks": subs, "graph": str(graph_path), "runs": runs, "skipped": skipped}


def _mean_sd(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def summarise(result: dict) -> dict:
    """Per arm: test metrics (mean ± sd over seeds), dev before/after, steps to reach random's best dev."""
    runs = result["runs"]
    random_best = {r["seed"]: r["dev"] for r in runs.get("random", [])}
    out = {}
    for arm, recs in runs.items():
        metrics = sorted({m for r in recs for m in (r.get("test_metrics") or {})})
        reach = [steps_to_reach([tuple(r["curve"][0]), tuple(r["curve"][1])], random_best[r["seed"]])
                 for r in recs if r["seed"] in random_best]
        out[arm] = {"n": len(recs), "test": {m: [r["test_metrics"].get(m) for r in recs if r.get("test_metrics")]
                                             for m in metrics},
                    "initial": [r["initial"] for r in recs], "dev": [r["dev"] for r in recs],
                    "reach": reach, "s_per_step": statistics.mean(r["s_per_step"] for r in recs),
                    "from_arm": recs[0].get("from_arm"), "examples": recs[0].get("examples") or []}
    return out


def markdown(res: dict) -> str:
    cfg, summary, target = res["config"], res["summary"], res["target"]
    m = res["machine"]
    lines = [f"Command: `{res['command']}`", "",
             f"Commit {res['commit']}; {m['cpu']} ({m['cpu_isa']}), {m['cpu_count']} cores, torch {m['torch']}, "
             f"peft {m['peft']}; wall {res['wall_s']:.0f} s ({res['reused_runs']} finished runs read back).", "",
             f"Target `{target}` on {cfg['model']}: {cfg['k_shot']} training rows (seeded by the run's seed), "
             f"{cfg['steps']} steps at batch {cfg['batch_size']}, prompt lr {cfg['lr']}, P = {cfg['prompt_length']}; "
             f"dev: {cfg['max_eval']} rows, test: a fixed subset of {cfg['max_test']} rows; seeds "
             f"{', '.join(map(str, cfg['seeds']))}. Modules ({', '.join(res['result']['subtasks'])}) trained "
             f"{cfg['source_steps']} steps each, seed 0, on their own train splits:", ""]
    lines += ["| module | prompt | dev before -> after |", "|---|---|---|"]
    for s, info in res["result"]["modules"].items():
        before = "" if info.get("initial") is None else f"{info['initial']:.3f} -> "
        lines.append(f"| {s} | {info['prompt']} | {before}{info['dev'] if info['dev'] is None else round(info['dev'], 3)} |")
    names = sorted({k for a in summary.values() for k in a["test"]})
    lines += ["", f"| arm | {' | '.join('test ' + n for n in names)} | dev before | dev best | steps to random's "
                  "best dev | s/step |", "|---" * (len(names) + 5) + "|"]
    for arm in ARMS:
        if arm not in summary:
            continue
        a = summary[arm]
        reach = ", ".join("-" if x is None else str(x) for x in a["reach"])
        label = f"{arm} (from {a['from_arm']})" if a.get("from_arm") else arm
        lines.append(f"| {label} | {' | '.join(_mean_sd(a['test'].get(n, [])) for n in names)} | "
                     f"{_mean_sd(a['initial'])} | {_mean_sd(a['dev'])} | {reach} | {a['s_per_step']:.1f} |")
    for arm, why in res["result"]["skipped"].items():
        lines.append(f"\n{arm}: not run ({why})")
    lines += ["", f"Test generations (seed {cfg['seeds'][0]}, the first {len(next(iter(summary.values()))['examples'])}"
                  " rows of the test subset):", ""]
    refs = next((a["examples"] for a in summary.values() if a["examples"]), [])
    for i, ex in enumerate(refs):
        lines.append(f"- row {i}, reference: \"{ex['references'][0]}\"")
        for arm in ARMS:
            if arm in summary and len(summary[arm]["examples"]) > i:
                lines.append(f"  - {arm}: \"{summary[arm]['examples'][i]['prediction']}\"")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)

    def lst(s: str) -> tuple[str, ...]:
        return tuple(x for x in s.split(",") if x)

    ap.add_argument("--target", default="woz-response")
    ap.add_argument("--graph", default=str(ROOT / "graphs" / "dialogue.yaml"), help="graph that decomposes the target")
    ap.add_argument("--modules", type=lst, help="the target's subtasks (default: the graph's decomposition)")
    ap.add_argument("--arms", type=lst, help=f"comma-separated arms from {','.join(ARMS)} (random always runs)")
    ap.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 0,1,2")
    for f, dest in (("module-steps", "source_steps"), ("steps", None), ("eval-every", None),
                    ("module-max-eval", "source_max_eval"), ("max-eval", None), ("max-test", None), ("shots", None),
                    ("k-shot", None), ("batch-size", None), ("prompt-length", None), ("full-prompt-length", None)):
        ap.add_argument(f"--{f}", type=int, dest=dest or f.replace("-", "_"))
    ap.add_argument("--lr", type=float)
    ap.add_argument("--model-lr", type=float)
    ap.add_argument("--model", help="backbone (default smollm2-135m; a decoder or an encoder-decoder)")
    ap.add_argument("--library", help="library of the module prompts (default runs/bench-library)")
    ap.add_argument("--runs", help="run folders (default runs/bench-dialogue)")
    ap.add_argument("--data-dir", help="data folder (default $PROMPT_COMPOSER_DATA, else ../shared/data)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--rerun", action="store_true", help="run every arm again, even when finished records exist")
    ap.add_argument("--time-budget", type=float, metavar="MINUTES",
                    help="start no new run after this many minutes; exit 3, and the same command goes on")
    ap.add_argument("--out-json", help="results JSON (default RUNS/results.json)")
    ap.add_argument("--out-md", help="also write the markdown section to this file")
    args = ap.parse_args(argv)
    values = dict(DEFAULTS)
    for f in dataclasses.fields(BenchConfig):
        v = getattr(args, f.name, None)
        if v is not None and v is not False:
            values[f.name] = v
    values["rerun"] = args.rerun
    values["data_dir"] = values.get("data_dir") or default_data_dir()
    bad = [a for a in values["arms"] if a not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {', '.join(bad)}: use {', '.join(ARMS)}")
    if "joint" in values["arms"] and not any(a in COMPOSED for a in values["arms"]):
        ap.error("--arms: joint starts from a composed init; add one of " + ", ".join(COMPOSED))
    if not Path(values["data_dir"]).is_dir():
        ap.error(f"--data-dir {values['data_dir']} does not exist; point it (or $PROMPT_COMPOSER_DATA) at ../shared/data")
    if args.modules is None:
        from composer import graph as G_
        from composer.graph_io import load_graph

        args.modules = tuple(s for s, _ in G_.subtasks(load_graph(args.graph), args.target))
    values["sources"], values["targets"] = args.modules, (args.target,)
    return BenchConfig(**values), args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    command = "python bench/dialogue.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    bench = Bench(cfg)
    try:
        result = run(bench, args.target, Path(args.graph))
    except OutOfTime as e:
        say(f"stopped: {e}; {time.time() - t0:.0f} s. The finished runs are kept: run the same command to go on.")
        raise SystemExit(3) from None
    import peft

    res = {"command": command, "commit": git_commit(), "config": dataclasses.asdict(cfg), "target": args.target,
           "machine": {"cpu": bench.cpu, "cpu_isa": bench.cpu_isa, "cpu_count": os.cpu_count(),
                       "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
           "result": result, "wall_s": round(time.time() - t0, 1), "reused_runs": bench.reused}
    res["summary"] = summarise(result)
    text = markdown(res)
    from composer.atomic import atomic_write_text

    out_json = Path(args.out_json or bench.runs / "results.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    if args.out_md:
        atomic_write_text(Path(args.out_md), text)
    print(text)
    say(f"results: {out_json}; {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
