"""Joint prompt-plus-model tuning against full model tuning and prompt tuning, on real targets.

For each target and seed, with the same step budget, batch, dev evaluations and kept checkpoint (the
best on dev, the init included) as bench/transfer.py:

  full            model tuning: every backbone weight trains (plus one random virtual token)
  prompt-random   prompt tuning from a random init (backbone frozen)
  prompt-composed prompt tuning from a composed init (--strategy over the top-k sources by zero-shot transfer)
  joint-random    prompt + every backbone weight, from a random prompt
  joint-composed  prompt + every backbone weight, from the composed init
  joint-loraR     prompt + PEFT LoRA of rank R (4, 8 or 16; alpha 2R, PEFT's default targets, --lora-lr 5e-4), from
                  a random prompt (`train --mode joint --adapter lora`); the backbone's own weights stay frozen
  multitask       one run per seed over the targets and the sources' few-shot splits at once (a prompt
                  per task, backbone frozen, size ** (1 / --temperature) sampling, --steps x number of
                  targets in all); each target is scored from its own best dev snapshot

Sources are the transfer benchmark's (trained once, reused from --library). Nothing is chosen on test.

    python bench/joint.py                        # 4 few-shot targets + cr, 3 seeds (about 70 minutes, 2 cores)
    python bench/joint.py --targets cr-fs --seeds 0 --steps 10      # a quick look
Output: markdown on stdout (and --out-md), every run in --out-json, a figure in bench/figures/joint.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import cpu_isa, cpu_label, cpu_model  # noqa: E402
from transfer import ROOT, Bench, BenchConfig, default_data_dir, git_commit, say  # noqa: E402
from transfer_report import fmt, mean_sd  # noqa: E402

LORA_RANKS = (4, 8, 16)
ARMS = ("full", "prompt-random", "prompt-composed", "joint-random", "joint-composed",
        *(f"joint-lora{r}" for r in LORA_RANKS), "multitask")


class JointBench(Bench):
    def __init__(self, cfg: BenchConfig):
        super().__init__(cfg)
        self.graphs: dict[str, Path] = {}

    def composed_init(self, target: str, sources: dict, seed: int, strategy: str) -> tuple[str, dict]:
        from composer.compose import ComposeConfig, compose

        cfg = self.cfg
        if target not in self.graphs:  # linked once per run (and target), shared by every seed
            self.graphs[target] = self.link_target(target, sources)[1]
        name = f"bench-joint-{target}-{self.slug}-{strategy}-s{seed}"
        cr = compose(ComposeConfig(graph=str(self.graphs[target]), target=target, strategy=strategy,
                                   top_k=cfg.top_k, metric="transfer", shots=self.few_shots(target), seed=seed,
                                   backbone=cfg.model, data_dir=cfg.data_dir, save=name),
                     library=self.lib, backbone=self.bb)
        return f"library:{name}", {"candidates": cr["candidates"], "weights": cr["weights"]}

    def multitask(self, seed: int, sources: dict, temperature: float) -> dict:
        from composer.multitask import MultiTaskConfig, prepare_multitask, train_multitask

        cfg = self.cfg
        tasks = list(cfg.targets) + multitask_sources(cfg.sources)
        run_dir = self.runs / f"multitask-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        mc = MultiTaskConfig(tasks=tasks, backbone=cfg.model, prompt_length=cfg.prompt_length,
                             steps=cfg.steps * len(cfg.targets), batch_size=cfg.batch_size, lr=cfg.lr,
                             sampling_temperature=temperature, eval_every=cfg.eval_every * len(cfg.targets),
                             checkpoint_every=cfg.steps * len(cfg.targets), max_eval=cfg.max_eval, seed=seed,
                             data_dir=cfg.data_dir, run_dir=str(run_dir))
        mp = prepare_multitask(mc, backbone=self.bb, library=self.lib)
        for k, prep in mp.tasks.items():  # the same dev and test subsets as the single-task arms
            prep.dev = prep.dev.subset(cfg.max_eval, 0)
            prep.test = prep.test.subset(cfg.max_test, 0) if prep.test is not None else None
        r = train_multitask(mc, library=self.lib, prepared=mp, progress=False)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
        return r


def multitask_sources(sources) -> list[str]:
    """The sources' few-shot splits where the catalogue has them (encoding MNLI or QQP whole per seed would
    cost minutes, and with temperature sampling they would crowd out the few-shot targets anyway)."""
    from composer.errors import TaskError
    from composer.tasks import load_task

    out = []
    for s in sources:
        try:
            load_task(f"{s}-fs")
            out.append(f"{s}-fs")
        except TaskError:  # no few-shot variant: the whole task
            out.append(s)
    return out


def trainable_counts(bb, prompt_length: int, full_prompt_length: int) -> dict[str, int]:
    H = bb.model.get_input_embeddings().weight.shape[1]
    backbone = sum(p.numel() for p in bb.model.parameters())
    prompt, full_prompt = prompt_length * H, full_prompt_length * H
    counts = {"full": backbone + full_prompt, "prompt-random": prompt, "prompt-composed": prompt,
              "joint-random": backbone + prompt, "joint-composed": backbone + prompt, "multitask": prompt}
    from composer.lora import default_targets

    targets = default_targets(bb.model)
    linears = [m for n, m in bb.model.named_modules() if n.split(".")[-1] in targets and hasattr(m, "in_features")]
    for r in LORA_RANKS:  # A [r, in] + B [out, r] per target Linear
        counts[f"joint-lora{r}"] = prompt + sum(r * (m.in_features + m.out_features) for m in linears)
    return counts


def run(cfg: BenchConfig, strategy: str, temperature: float, arms: tuple[str, ...]) -> dict:
    bench = JointBench(cfg)
    t0 = time.time()
    # only the composed arms and multitask read the sources
    sources = bench.train_sources() if {"prompt-composed", "joint-composed", "multitask"} & set(arms) else {}
    results: dict = {t: {"runs": {}, "composed": []} for t in cfg.targets}
    for target in cfg.targets:
        res = results[target]
        for seed in cfg.seeds:
            def add(arm: str, rec: dict):
                res["runs"].setdefault(arm, []).append(rec)
                say(f"[{target}] seed {seed} {arm:<15} dev {rec['initial']:.3f} -> {rec['dev']:.3f}  test "
                    f"{fmt(rec['test'])}  ({rec.get('s_per_step', 0):.2f} s/step)")

            if "full" in arms:
                add("full", bench.tune(target, "random", seed, cfg.steps, f"full-s{seed}", mode="joint",
                                       prompt_length=cfg.full_prompt_length))
            if "prompt-random" in arms:
                add("prompt-random", bench.tune(target, "random", seed, cfg.steps, f"random-s{seed}"))
            if "joint-random" in arms:
                add("joint-random", bench.tune(target, "random", seed, cfg.steps, f"joint-random-s{seed}",
                                               mode="joint"))
            for r in LORA_RANKS:
                if f"joint-lora{r}" in arms:
                    add(f"joint-lora{r}", bench.tune(target, "random", seed, cfg.steps, f"joint-lora{r}-s{seed}",
                                                     mode="joint", lora_r=r))
            if {"prompt-composed", "joint-composed"} & set(arms):
                init, info = bench.composed_init(target, sources, seed, strategy)
                res["composed"].append(dict(info, seed=seed))
                if "prompt-composed" in arms:
                    add("prompt-composed", bench.tune(target, init, seed, cfg.steps, f"composed-s{seed}"))
                if "joint-composed" in arms:
                    add("joint-composed", bench.tune(target, init, seed, cfg.steps, f"joint-composed-s{seed}",
                                                     mode="joint"))
    if "multitask" in arms:
        for seed in cfg.seeds:
            say(f"[multitask] seed {seed}: {', '.join(list(cfg.targets) + multitask_sources(cfg.sources))}, "
                f"{cfg.steps * len(cfg.targets)} steps")
            r = bench.multitask(seed, sources, temperature)
            for target in cfg.targets:
                p = r["per_task"][target]
                rec = {"seed": seed, "initial": p["initial"]["score"], "dev": p["dev"]["score"],
                       "test": (p.get("test") or {}).get("score"), "best_step": p["best_step"],
                       "probability": r["probabilities"][target], "seconds": r["seconds"],
                       "s_per_step": r["seconds"] / max(1, r["steps"])}
                results[target]["runs"].setdefault("multitask", []).append(rec)
                say(f"[{target}] seed {seed} multitask       dev {rec['initial']:.3f} -> {rec['dev']:.3f}  "
                    f"test {fmt(rec['test'])}  (sampled with p={rec['probability']:.3f})")
    return {"config": {**cfg.__dict__, "strategy": strategy, "temperature": temperature, "arms": list(arms)},
            "sources": sources, "targets": results, "seconds": round(time.time() - t0, 1),
            "trainable": trainable_counts(bench.bb, cfg.prompt_length, cfg.full_prompt_length)}


def summarise(res: dict) -> dict:
    out = {}
    for target, t in res["targets"].items():
        out[target] = {}
        for arm, runs in t["runs"].items():
            tm, tsd = mean_sd([r["test"] for r in runs])
            dm, dsd = mean_sd([r["dev"] for r in runs])
            out[target][arm] = {"test": tm, "test_sd": tsd, "dev": dm, "dev_sd": dsd, "n": len(runs),
                                "s_per_step": mean_sd([r.get("s_per_step") for r in runs])[0]}
    return out


def figure(summary: dict, arms: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(targets) * len(arms) / 3), 4.2))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(targets))]
        ms = [summary[t].get(arm, {}).get("test") or 0.0 for t in targets]
        sds = [summary[t].get(arm, {}).get("test_sd") or 0.0 for t in targets]
        ax.bar(xs, ms, width, yerr=sds, capsize=2, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(targets))], targets)
    ax.set_ylabel("test score (mean ± sd over seeds)")
    lo = min((summary[t][a]["test"] for t in targets for a in summary[t] if summary[t][a]["test"] is not None),
             default=0.0)
    ax.set_ylim(max(0.0, math.floor(lo * 10) / 10 - 0.1), 1.0)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_title("joint vs full vs prompt tuning (same step budget)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(res: dict, summary: dict, command: str, fig: str | None) -> str:
    c = res["config"]
    arms = [a for a in ARMS if a in c["arms"]]
    tr = res["trainable"]
    lines = [
        "## Joint tuning vs full model tuning vs prompt tuning (bench/joint.py)", "",
        f"Command: `{command}`  ",
        f"Commit {git_commit()}, {cpu_label(cpu_model(), cpu_isa())}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}; {res['seconds']:.0f} s in all.", "",
        f"Backbone {c['model']}; {c['steps']} steps per arm (multitask: {c['steps'] * len(c['targets'])} steps over "
        f"the targets and {', '.join(multitask_sources(c['sources']))}, temperature {c['temperature']}), batch {c['batch_size']}, "
        f"prompt length {c['prompt_length']}, prompt lr {c['lr']}, backbone lr {c['model_lr']} (full and joint, every "
        f"weight); composed init: {c['strategy']} over the top {c['top_k']} of {', '.join(c['sources'])} "
        f"(each trained {c['source_steps']} steps) by zero-shot transfer. Dev: a fixed subset of {c['max_eval']}, "
        f"checkpoint with the best dev score kept (the init included); test: a fixed subset of {c['max_test']}. "
        f"Seeds {', '.join(map(str, c['seeds']))}: mean ± sd of the test score.", "",
        "| target | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms),
    ]
    for target, s in summary.items():
        cells = [fmt(s[a]["test"], s[a]["test_sd"]) if a in s else "–" for a in arms]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    means = {a: mean_sd([summary[t][a]["test"] for t in summary if a in summary[t]])[0] for a in arms}
    lines.append("| **mean** | " + " | ".join(fmt(means[a]) for a in arms) + " |")
    lines.append("| trainable parameters per task | " + " | ".join(f"{tr[a]:,}" for a in arms) + " |")
    lines.append("| seconds per step (mean) | " + " | ".join(
        fmt(mean_sd([summary[t][a]["s_per_step"] for t in summary if a in summary[t]])[0], digits=2)
        for a in arms) + " |")
    if fig:
        lines += ["", f"![joint]({fig})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="rte-fs,mrpc-fs,cb-fs,cr-fs,cr")
    p.add_argument("--sources", default="qqp,mnli,sst2,mr")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="minilm")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--source-steps", type=int, default=60, help="the sources of bench/transfer.py --quick")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--max-test", type=int, default=300)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--strategy", default="average", help="composer strategy of the composed init")
    p.add_argument("--temperature", type=float, default=10.0, help="multitask sampling temperature")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--model-lr", type=float, default=5e-5)
    p.add_argument("--library", default="runs/bench-library")
    p.add_argument("--data-dir", default=None, help="default $PROMPT_COMPOSER_DATA, else ../shared/data")
    p.add_argument("--out-json", default="runs/bench-joint/results.json")
    p.add_argument("--out-md", default=None)
    p.add_argument("--figure", default="bench/figures/joint.png")
    a = p.parse_args(argv)
    data_dir = a.data_dir or default_data_dir()
    if not Path(data_dir).is_dir():
        p.error(f"--data-dir {data_dir} does not exist; point it (or $PROMPT_COMPOSER_DATA) at ../shared/data")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    lst = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    arms = lst(a.arms)
    bad = [x for x in arms if x not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ARMS)}")
    cfg = BenchConfig(tier="joint", sources=lst(a.sources), targets=lst(a.targets), arms=arms,
                      seeds=tuple(int(s) for s in lst(a.seeds)), model=a.model, source_steps=a.source_steps,
                      steps=a.steps, eval_every=a.eval_every, max_eval=a.max_eval, max_test=a.max_test,
                      top_k=a.top_k, lr=a.lr, model_lr=a.model_lr, library=a.library, data_dir=data_dir,
                      runs="runs/bench-joint")
    command = "python bench/joint.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    res = run(cfg, a.strategy, a.temperature, arms)
    summary = summarise(res)
    res["summary"] = summary
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(res, indent=2, default=str))
    fig = figure(summary, [x for x in ARMS if x in arms], ROOT / a.figure) if a.figure else None
    rel = str(Path(a.figure).relative_to("bench")) if a.figure and a.figure.startswith("bench/") else a.figure
    md = markdown(res, summary, command.strip(), rel if fig else None)
    print(md)
    if a.out_md:
        Path(a.out_md).write_text(md)


if __name__ == "__main__":
    main()
