"""The demo: the whole pipeline on the built-in suite, with a report.

    1. train (or reuse) the prompts of the graph's subtasks: polarity, negation, topic
    2. link the graph: each target's top sources by zero-shot transfer
    3. compose each target's prompt with every strategy
    4. tune each composed prompt for the same short few-shot budget, next to a random-init baseline
    5. write runs/demo/report.md with the results table, the graph picture and the learning curves
"""
from __future__ import annotations

import json
import re
import logging
import time
from dataclasses import asdict
from pathlib import Path

from composer import graph as G_
from composer.atomic import atomic_write_text
from composer.backbones import load_backbone
from composer.compose import compose
from composer.config import ComposeConfig, DemoConfig, TrainConfig
from composer.library import Library
from composer.runstate import read_curves
from composer.train import prepare, train
from composer.transfer import link_graph

log = logging.getLogger(__name__)


def model_slug(model: str) -> str:
    """minilm -> minilm; a path or hub id -> its last part, safe as a library name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name).strip("-.") or "model"


def read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, dev scores) of a single-task run's evaluations, from its metrics.jsonl."""
    return read_curves(run_dir).get("dev", ([], []))


def steps_to_reach(curve: tuple[list[int], list[float]], level: float) -> int | None:
    """The first evaluated step whose dev score reaches ``level`` (None if never)."""
    for s, v in zip(*curve):
        if v >= level - 1e-9:
            return s
    return None


def compose_config(cfg: DemoConfig, graph, target: str, strategy: str, save: str, **overrides) -> ComposeConfig:
    """How the demo composes a target: its top-2 sources by zero-shot transfer, its shots and seed."""
    return ComposeConfig(graph=str(graph), target=target, strategy=strategy, top_k=2, metric="transfer",
                         shots=cfg.shots, seed=cfg.seed, backbone=cfg.backbone, save=save, **overrides)


def arm_config(cfg: DemoConfig, task: str, init: str, run_dir) -> TrainConfig:
    """How the demo tunes one arm on a target: the same budget, data and settings for every init."""
    return TrainConfig(task=task, backbone=cfg.backbone, prompt_length=cfg.prompt_length, init=init, kind=cfg.kind,
                       steps=cfg.target_steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=cfg.eval_every,
                       max_eval=cfg.max_eval, seed=cfg.seed, k_shot=cfg.k_shot, run_dir=str(run_dir))


def run_demo(cfg: DemoConfig, library: Library | None = None, progress: bool = True, echo=print) -> dict:
    from composer.plots import draw_graph, learning_curves, weights_per_class  # lazy: matplotlib is heavy

    t0 = time.time()
    lib = library or Library()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bb = load_backbone(cfg.backbone)
    G = G_.load_graph(cfg.graph)

    # 1. subtask and source prompts
    sources = [n for n, d in G.nodes(data=True) if d.get("role") in ("source", "subtask")]
    slug = model_slug(cfg.backbone) + ("-prefix" if cfg.kind == "prefix" else "")  # prefixes: names of their own
    for n in G.nodes:  # prompts are named per backbone: another --model never overwrites the minilm ones
        G.nodes[n]["prompt"] = f"{n}-{slug}"
    source_results = {}
    for n in sources:
        name = G.nodes[n]["prompt"]
        if (lib.exists(name) and not cfg.retrain and lib.meta(name).get("backbone") == cfg.backbone
                and lib.meta(name).get("kind", "prompt") == cfg.kind):
            echo(f"[1/4] reuse prompt {name} from {lib.root}")
            source_results[n] = {"reused": True, "dev": (lib.meta(name).get("metrics") or {}).get("dev")}
            continue
        echo(f"[1/4] train prompt {name} ({cfg.source_steps} steps)")
        tc = TrainConfig(task=G.nodes[n].get("task") or n, backbone=cfg.backbone, prompt_length=cfg.prompt_length,
                         kind=cfg.kind, steps=cfg.source_steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_every=max(1, cfg.source_steps // 3),
                         max_eval=cfg.max_eval, seed=cfg.seed, save=name, run_dir=str(out / "sources" / n))
        r = train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=progress)
        source_results[n] = {"reused": False, "dev": r["dev"], "initial": r["initial"]}
        echo(f"      dev accuracy {r['initial']['score']:.3f} -> {r['dev']['score']:.3f}")

    # 2. link the targets to their sources by zero-shot transfer
    echo("[2/4] link the graph by zero-shot transfer")
    links = link_graph(G, lib, metric="transfer", top_k=2, targets=list(cfg.targets), max_examples=cfg.max_eval,
                       backbone=bb)
    G_.save_graph(G, out / "graph.json")
    draw_graph(G, out / "graph.png", title="demo task graph (similar = zero-shot transfer)")

    # 3 + 4. compose with every strategy, tune every arm with the same budget
    results: dict = {}
    for target in cfg.targets:
        arms: dict = {}
        spec_task = G.nodes[target].get("task") or target
        inits = {"random": "random"}
        for strat in cfg.strategies:
            name = f"demo-{target}-{strat}" + ("-prefix" if cfg.kind == "prefix" else "")
            echo(f"[3/4] compose {target} with {strat}")
            cr = compose(compose_config(cfg, out / "graph.json", target, strat, name), library=lib, backbone=bb)
            inits[strat] = f"library:{name}"
            arms[strat] = {"compose": {k: cr[k] for k in ("candidates", "weights") if k in cr}}
            if strat == "attention" and cr.get("per_class"):
                weights_per_class(cr["per_class"], cr["candidates"] + ["(target)"], out / f"{target}-attention.png",
                                  title=f"{target}: attention weights per class")
        curves = {}
        for arm, init in inits.items():
            echo(f"[4/4] tune {target} from {arm} ({cfg.target_steps} steps, {cfg.k_shot} per class)")
            tc = arm_config(cfg, spec_task, init, out / target / arm)
            r = train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=progress)
            curves[arm] = read_curve(out / target / arm)
            arms.setdefault(arm, {}).update(initial=r["initial"]["score"], dev=r["best"],
                                            test=(r.get("test") or {}).get("score"), best_step=r["best_step"])
        base_final = arms["random"]["dev"]
        for arm in arms:
            arms[arm]["steps_to_random_final"] = steps_to_reach(curves[arm], base_final)
        learning_curves({k: v for k, v in curves.items()}, out / f"{target}-curves.png",
                        title=f"{target}: dev accuracy while tuning ({cfg.k_shot} examples per class)",
                        baseline="random")
        results[target] = arms
    report = {"config": asdict(cfg), "sources": source_results, "links": links["scores"], "targets": results,
              "seconds": round(time.time() - t0, 1), "library": str(lib.root), "machine": machine()}
    report["claim"] = claim(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=True, default=str))
    atomic_write_text(out / "report.md", render_report(report))
    return report


def machine() -> dict:
    """The CPU and the kernel level torch runs on it: float results differ by instruction set, not only by vendor."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's name
    return {"cpu": cpu, "cpu_isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def claim(report: dict) -> dict:
    """Does every composed init beat the random init on every target? On test accuracy where every arm has one
    (reported only: nothing is chosen by it), else on the best dev accuracy."""
    arms = [a for t in report["targets"].values() for a in t.values()]
    split = "test" if all(a.get("test") is not None for a in arms) else "dev"
    short = []
    for target, t in report["targets"].items():
        base = t["random"][split]
        short += [f"{target} {arm} {r[split]:.3f} <= random {base:.3f}" for arm, r in t.items()
                  if arm != "random" and not r[split] > base]
    return {"holds": not short, "split": split, "targets": len(report["targets"]), "short": short}


def claim_line(c: dict) -> str:
    which = "both targets" if c["targets"] == 2 else "every target"
    verdict = "yes" if c["holds"] else "no (" + "; ".join(c["short"]) + ")"
    return f"every composed init beats random on {which} ({c['split']} accuracy): {verdict}"


def results_table(report: dict) -> str:
    lines = ["| target | init | dev acc. at step 0 | dev acc. after tuning (best checkpoint) | test acc. | "
             "steps to random's final |",
             "|---|---|---:|---:|---:|---:|"]
    for target, arms in report["targets"].items():
        for arm, r in arms.items():
            reach = r.get("steps_to_random_final")
            test = "" if r.get("test") is None else f"{r['test']:.3f}"
            lines.append(f"| {target} | {arm} | {r['initial']:.3f} | {r['dev']:.3f} | {test} | "
                         f"{'never' if reach is None else reach} |")
    return "\n".join(lines) + "\n\n" + claim_line(report.get("claim") or claim(report))


def render_report(report: dict) -> str:
    c = report["config"]
    parts = [
        "# prompt-composer demo report", "",
        f"Backbone `{c['backbone']}`, graph `{c['graph']}`, "
        + ("**prefixes** (keys and values in every attention layer) of length " if c.get("kind") == "prefix"
           else "prompt length ") + f"{c['prompt_length']}, seed {c['seed']}. "
        f"Every arm on a target is tuned for {c['target_steps']} steps on {c['k_shot']} training examples per class "
        f"(batch {c['batch_size']}, prompt lr {c['lr']}); dev accuracy on {c['max_eval']} held-out examples "
        f"(the checkpoint with the best dev accuracy is kept, the init included), test accuracy on the whole test split. "
        f"Total time {report['seconds']} s on {report['machine']['cpu']} (torch {report['machine']['torch']}, "
        f"CPU kernels {report['machine']['cpu_isa']}; another instruction set rounds differently: expect the same "
        f"ordering, not the same digits).", "",
        "## Results", "", results_table(report), "",
        "`random` is prompt tuning from a random init; the other arms start from a prompt composed out of the "
        "subtask and source prompts (`concat` joins the subtask prompts, so its prompt is longer).", "",
        "## The task graph", "", "![graph](graph.png)", "",
        "Similar edges: zero-shot transfer of each source prompt to the target (dev accuracy).", "",
    ]
    for t, sc in report["links"].items():
        parts.append(f"- {t}: " + ", ".join(f"{k} {v:.3f}" for k, v in sc.items()))
    parts += ["", "## Learning curves", ""]
    for t in report["targets"]:
        parts += [f"![{t}]({t}-curves.png)", ""]
        if Path(report["config"]["out"], f"{t}-attention.png").exists():
            parts += [f"![{t} attention]({t}-attention.png)", ""]
    return "\n".join(parts) + "\n"
