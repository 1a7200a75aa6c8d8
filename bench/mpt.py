"""MPT (composer/mpt.py): the step cost of the decomposition, and a small quality check on the demo graph.

speed: one mixed multitask batch of the demo graph's three subtasks (polarity, negation, topic), minilm,
P = 20, and one training step (composer/multitask.py's: MultiTaskModel forward -> per-row loss -> mean ->
composer/loop.py's training_step: backward, clip, AdamW, schedule) for three models built by
prepare_multitask from the same config but --shared:

  plain   --shared none: a SoftPrompt per task
  mpt     --shared mpt, distill weights 0: each task's prompt is P* ∘ (u_k v_kᵀ) (the decomposition alone)
  distill --shared mpt with the default weights: the decomposition + each row's teacher forward (no grad, no
          dropout) + KL and hidden-state MSE (stage 1's full step); teachers are random prompts, which
          costs the same as trained ones

The arms are stepped in turn within each repeat (plain, mpt, distill, plain, ...), so load from other
processes falls on all of them alike; the table gives medians and the median of the per-repeat ratios.

quality: the demo's few-shot target budget (DemoConfig's: 40 steps, 16 examples per class, batch 16,
lr 0.3, P = 20) on negated-polarity and topic-polarity from several inits: random; the attention composer
over the target's subtasks (compose --strategy attention --top-k 0, the module as the demo saves it); and
MPT's target adaptation from an MPT entry distilled from the three subtask prompts (stage 1: --shared mpt
over the graph's subtasks), u, v at ones (P*), at their mean (@mean), and at polarity's (@polarity, a subtask
of both targets), and PEFT's MultitaskPromptTuning as the peer from the same MPT entry (exported with
`library export-peft`; PEFT's own AVERAGE_SOURCE_TASKS and EXACT_SOURCE_TASK inits, its module, trained in the
same loop: PeftMPTSource). The subtask prompts are trained as the demo trains them (80 steps) into a private
library.

    python bench/mpt.py --part speed --repeats 20 --threads 2
    python bench/mpt.py --part quality --mpt-steps 100 --threads 2
    python bench/mpt.py --part quality --arms "random,mpt @mean,PEFT MPT @mean,mpt @polarity,PEFT MPT @polarity"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peft_arm.py: the PEFT peer

import torch  # noqa: E402

from peft_arm import PeftMPTSource  # noqa: E402

from composer.demo import machine  # noqa: E402

SUBTASKS = ["polarity", "negation", "topic"]


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _cfg(out: Path, **kw):
    from composer.config import MultiTaskConfig

    base = dict(tasks=SUBTASKS, backbone="minilm", prompt_length=20, steps=1000, batch_size=32, lr=0.3,
                eval_every=1000, max_eval=16, seed=0, run_dir=str(out / "run"))
    return MultiTaskConfig(**{**base, **kw})


def speed(args) -> dict:
    from composer.backbones import load_backbone
    from composer.library import Library
    from composer.loop import Optimizer, RunFolder, make_accelerator, seed_step, training_step
    from composer.multitask import _batch, prepare_multitask
    from composer.runstate import MixturePlan

    out = Path(args.out_dir)
    lib = Library(out / "library-speed")
    bb = load_backbone("minilm")
    g = torch.Generator().manual_seed(0)
    for t in SUBTASKS:  # random teachers: a teacher's forward costs the same whatever its values
        lib.save(t, torch.randn(20, bb.hidden_size, generator=g) * 0.05,
                 {"task": t, "backbone": bb.name, "family": bb.family, "head": "label-similarity"})
    arms = {"plain": _cfg(out), "mpt": _cfg(out, shared="mpt", distill_kl=0.0, distill_hidden=0.0),
            "distill": _cfg(out, shared="mpt")}
    acc = make_accelerator("no", find_unused_parameters=True)
    built = {}
    for name, cfg in arms.items():
        mp = prepare_multitask(cfg, backbone=bb, library=lib)
        built[name] = (mp, Optimizer(cfg, mp.model), cfg)
    mp0 = built["plain"][0]
    keys = list(mp0.model.tasks)
    plan = MixturePlan([len(mp0.tasks[k].train) for k in keys], args.batch_size, 0, 1.0)
    batch = _batch(mp0, keys, plan.indices(0), bb.tokenizer.pad_token_id)  # one fixed mixed batch
    run = RunFolder(out / "unused", acc)

    def step(name):
        mp, opt, cfg = built[name]
        mp.model.train()
        seed_step(0, 0, acc.device)
        t0 = time.perf_counter()
        loss = mp.model(batch["input_ids"], batch["attention_mask"], batch["task_ids"], labels=batch["labels"]).mean()
        training_step(acc, loss, opt, cfg.max_grad_norm, 0, run, cfg.lr)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for name in arms:
            step(name)
    times = {name: [] for name in arms}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name in arms:
            times[name].append(step(name))
    load1 = os.getloadavg()[0]
    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    paired = {n: statistics.median(a / b for a, b in zip(times[n], times["plain"])) for n in ("mpt", "distill")}
    n_params = {n: sum(p.numel() for p in built[n][1].trainable) for n in arms}
    return {"part": "speed", "B": args.batch_size, "T": int(batch["input_ids"].shape[1]), "P": 20,
            "repeats": args.repeats, "median_ms": med, "paired_ratio_vs_plain": paired,
            "trainable": n_params, "load": [load0, load1]}


def quality(args) -> dict:
    from composer.backbones import load_backbone
    from composer.compose import compose
    from composer.config import ComposeConfig, DemoConfig, TrainConfig
    from composer.library import Library
    from composer.multitask import train_multitask
    from composer.train import prepare, train

    d = DemoConfig()
    out = Path(args.out_dir)
    lib = Library(out / "library")
    bb = load_backbone("minilm")
    sources = {}
    for t in SUBTASKS:  # as the demo trains its subtask prompts
        name = f"{t}-minilm"
        if not lib.exists(name):
            tc = TrainConfig(task=t, backbone="minilm", prompt_length=d.prompt_length, steps=d.source_steps,
                             batch_size=d.batch_size, lr=d.lr, eval_every=max(1, d.source_steps // 3),
                             max_eval=d.max_eval, seed=d.seed, save=name, run_dir=str(out / "sources" / t))
            train(tc, prepared=prepare(tc, backbone=bb, library=lib), library=lib, progress=False)
        sources[t] = lib.meta(name)["metrics"]["dev"]["score"]
    t0 = time.time()
    mcfg = _cfg(out, tasks=None, graph="demo", shared="mpt", steps=args.mpt_steps, batch_size=d.batch_size,
                lr=d.lr, eval_every=max(1, args.mpt_steps // 2), max_eval=d.max_eval, save_prefix="mpt-",
                run_dir=str(out / "mpt-stage1"))
    r1 = train_multitask(mcfg, library=lib, progress=False)
    stage1 = {"seconds": round(time.time() - t0, 1),
              "per_task_dev": {k: v["dev"]["score"] for k, v in r1["per_task"].items()},
              "teachers_dev": sources}
    rows = [json.loads(x) for x in open(out / "mpt-stage1" / "metrics.jsonl") if '"distill"' in x]
    stage1["distill_first_last"] = [rows[0]["distill"], rows[-1]["distill"]] if rows else None
    from composer.peft_io import export_peft

    adapter = export_peft(lib, "mpt-shared", out / "peft-mpt-shared", overwrite=True)  # PEFT's own format
    tasks = json.loads((adapter / "prompt-composer.json").read_text())["task_ids"]
    peft_arms = {"PEFT MPT @mean": ("AVERAGE_SOURCE_TASKS", 0),
                 "PEFT MPT @polarity": ("EXACT_SOURCE_TASK", tasks["polarity"])}
    results = {}
    for target in ("negated-polarity", "topic-polarity"):
        name = f"att-{target}"
        inits = {"random": "random", "attention": f"library:{name}", "mpt (ones: P*)": "library:mpt-shared",
                 "mpt @mean": "library:mpt-shared@mean", "PEFT MPT @mean": None,
                 "mpt @polarity": "library:mpt-shared@polarity", "PEFT MPT @polarity": None}
        wanted = [a for a in inits if not args.arms or a in args.arms]
        if "attention" in wanted:
            compose(ComposeConfig(graph="demo", target=target, strategy="attention", top_k=0, shots=d.shots,
                                  seed=d.seed, backbone="minilm", save=name), library=lib, backbone=bb)
        arms = {}
        for arm in wanted:
            init = inits[arm]
            tc = TrainConfig(task=target, backbone="minilm", prompt_length=d.prompt_length, init=init or "random",
                             steps=d.target_steps, batch_size=d.batch_size, lr=d.lr, eval_every=d.eval_every,
                             max_eval=d.max_eval, seed=d.seed, k_shot=d.k_shot,
                             run_dir=str(out / target / "".join(c if c.isalnum() else "-" for c in arm)))
            source = None
            if arm in peft_arms:
                peft_init, source_task = peft_arms[arm]
                source = PeftMPTSource(adapter, peft_init, bb.network.get_input_embeddings(), source_task=source_task)
            r = train(tc, prepared=prepare(tc, backbone=bb, library=lib, prompt_source=source), library=lib,
                      progress=False)
            arms[arm] = {"initial": r["initial"]["score"], "best_dev": r["best"],
                         "test": (r.get("test") or {}).get("score"), "best_step": r["best_step"]}
        results[target] = arms
    return {"part": "quality", "mpt_steps": args.mpt_steps, "stage1": stage1, "targets": results,
            "budget": {"steps": d.target_steps, "k_shot": d.k_shot, "batch_size": d.batch_size, "lr": d.lr,
                       "max_eval": d.max_eval}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("speed", "quality"), required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mpt-steps", type=int, default=100)
    ap.add_argument("--arms", type=lambda x: [a.strip() for a in x.split(",") if a.strip()], default=None,
                    help="quality: only these arms (comma-separated names as in the table; default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default="runs/bench-mpt")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = speed(args) if args.part == "speed" else quality(args)
    res.update(command="python bench/mpt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               commit=commit(), machine=machine(), threads=args.threads, seconds=round(time.time() - t0, 1))
    text = json.dumps(res, indent=2, sort_keys=True, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
