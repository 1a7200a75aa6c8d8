"""The transfer benchmark: does a composed init pay, side by side with its peers, on real data?

For each target task (few-shot splits), every arm tunes for the same number of steps (same batch
size, same prompt learning rate, same dev evaluations, best dev checkpoint kept, the init included):

  random     prompt tuning from a random init (the baseline every other arm is measured against)
  vocab      prompt tuning from sampled vocabulary embeddings
  peft       PEFT's PromptTuning on the same backbone in this process (the peer); its prompt starts
             from random's init, its loss is our head's (label similarity for minilm; bench/peft_arm.py,
             on bench/step_overhead.py's PEFT setup, which checks the two compute the same function)
  mixture    SPoT's multi-task source: one prompt trained on every source task at once (mixed batches,
             each task its own head; --mixture-steps, kept at the best mean dev score), tuned from there
  mpt        MPT: stage 1 distils the source prompts (teachers: logits KL + hidden-state MSE) into one shared
             prompt and a rank-1 factor pair per source (--mpt-steps, the last state kept); the target adapts
             from the shared prompt with the sources' mean factors (library:NAME@mean)
  peft-mpt   the peer of mpt: PEFT's MultitaskPromptEmbedding with PEFT's own AVERAGE_SOURCE_TASKS init from
             that entry (exported with `library export-peft`), tuned in the same loop (input-level prompts only)
  best       SPoT: the top-k source prompt that scores best zero-shot on the target's few shots
  average    similarity-weighted average of the top-k source prompts (weights: zero-shot transfer)
  linear     weights optimised on the few shots (L-BFGS-B, gradient-based); linear-gf: Powell
  attention  ATTEMPT: a per-example attention mixture, trained on with the target prompt
  concat     the graph's subtask prompts joined (only where graphs/glue-superglue.yaml decomposes it)
  full       model tuning: every backbone weight trains (plus one random virtual token, since our
             model always has a prompt), model lr --model-lr
  joint      prompt + model tuning from the best composed init (chosen by dev score at step 0)

Sources are trained once (seed 0) and kept in --library, reused when a prompt of the same name is
there (the name holds the backbone and the step budget). Targets are linked to sources by zero-shot
transfer (each source prompt scored on the target's dev split) into a graph built from
graphs/glue-superglue.yaml's nodes and decompositions. Transferability: for every source-target pair,
the gain of a short tuning run from that source over the same run from random (seed 0), against
cos-avg, cos-tok and on similarity (source prompt vs the target's random-init tuned prompt) and
zero-shot transfer: Spearman over all pairs.

Tiers (2 CPU cores, minilm):
    python bench/transfer.py --smoke              # a few minutes: proves the pipeline end to end
    python bench/transfer.py --quick              # under 20 minutes: 4 sources, 2 targets, 1 seed
    python bench/transfer.py --full               # about 15 hours: 8 sources, 6 few-shot targets + CR, 3 seeds
Every tier takes overrides, e.g. --targets rte-fs --arms random,best,full --seeds 0,1. The decoder run of
bench/RESULTS.md (smollm2-135m, few-shot CR, 3 seeds; about 1.5 hours on 2 cores, records in
bench/records/quick-smollm2):
    python bench/transfer.py --quick --model smollm2-135m --sources sst2,mr,agnews,trec --targets cr-fs \
        --arms random,vocab,peft,best,average,linear,attention,full,joint --seeds 0,1,2 --steps 60 \
        --source-steps 80 --source-max-eval 100 --runs runs/bench-transfer/quick-smol --figures runs/figs-smol
(--figures keeps it off the minilm quick tier's bench/figures/transfer-quick-cr-fs.png; the committed copy
is bench/figures/transfer-quick-smollm2-cr-fs.png)

--kind prefix runs every prompt arm (sources included) on prefixes, keys and values in every attention layer,
named apart in the library (SOURCE-minilm-prefix-STEPS); peft becomes PEFT's PrefixTuning, full stays model
tuning with one virtual token. The prefix run of bench/RESULTS.md (4 sources, 2 targets, 3 seeds):
    python bench/transfer.py --full --kind prefix --lr 0.03 --sources qqp,mnli,sst2,mr --targets mrpc-fs,cr-fs \
        --arms random,peft,best,average,attention --seeds 0,1,2 --source-steps 500 --pair-steps 30 \
        --runs runs/bench-transfer/full-prefix --figures runs/figs-prefix

Nothing finished is lost: each tuning run and each composition writes a record (record.json, with
what it depends on: settings, init prompt's content hash) into its run folder, and a later invocation
with the same settings reads it back instead of running again (--rerun: run everything). A killed
run starts its own arm over; the full tier can be run piecewise (--targets cola-fs,cr-fs then the
rest, or --time-budget MINUTES: start no new run after that, exit 3, the same command goes on) and a
last invocation over every target writes the whole report from the records. Run folders
live under runs/ (not in git): bench/records.py saves the records and the prompts they start from to
bench/records/TIER/ (in git) and restores them on another machine, so a tier can span sessions.
Output: a results JSON (--out-json), a markdown section (stdout and --out-md), PNG figures under
bench/figures/ (--figures; the smoke tier keeps its figures in its run folder), all made by
bench/transfer_report.py from the results alone. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing
sys.path.insert(0, str(ROOT / "bench"))  # its siblings: peft_arm.py, step_overhead.py, transfer_report.py

import torch  # noqa: E402
from step_overhead import cpu_isa, cpu_label, cpu_model  # noqa: E402
from transfer_report import (ARMS, COMPOSED, correlations, figure_target, fmt, markdown,  # noqa: E402
                             summarise_target)

from composer.demo import read_curve  # noqa: E402

log = logging.getLogger("bench.transfer")

TIERS = {
    "smoke": dict(sources=("sst2", "mr"), targets=("cr-fs",),
                  arms=("random", "vocab", "peft", "best", "average", "linear", "attention", "full", "joint"),
                  seeds=(0,), source_steps=4, steps=4, eval_every=2, source_max_eval=32, max_eval=32,
                  max_test=32, top_k=2),
    # rte-fs (long premises) costs 3-5x a cr-fs step: the quick tier takes mrpc-fs to stay under 20 minutes
    "quick": dict(sources=("qqp", "mnli", "sst2", "mr"), targets=("mrpc-fs", "cr-fs"),
                  arms=("random", "vocab", "peft", "best", "average", "linear", "attention", "full", "joint"),
                  seeds=(0,), source_steps=60, steps=40, eval_every=10, source_max_eval=200, max_eval=200,
                  max_test=500, top_k=2),
    "full": dict(sources=("mnli", "qnli", "qqp", "sst2", "snli", "mr", "agnews", "trec"),
                 targets=("cola-fs", "cr-fs", "mrpc-fs", "cb-fs", "rte-fs", "boolq-fs", "cr"),
                 arms=ARMS, seeds=(0, 1, 2), source_steps=300, steps=100, eval_every=10, source_max_eval=500,
                 max_eval=500, max_test=1000, top_k=3),
}


@dataclass
class BenchConfig:
    """One benchmark run; saved into the results JSON."""

    tier: str = "quick"
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    arms: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    model: str = "minilm"
    source_steps: int = 60
    """Steps per source prompt (full training split, seed 0)."""
    steps: int = 60
    """The budget of every arm on every target."""
    pair_steps: int | None = None
    """Budget of the transferability runs (source init vs random, seed = first seed); None = steps."""
    eval_every: int = 10
    source_max_eval: int = 200
    """Source dev examples evaluated (a fixed subset)."""
    max_eval: int = 200
    """Target dev examples evaluated (a fixed subset; the few-shot dev splits have 32 to 64)."""
    max_test: int | None = 500
    """Target test examples evaluated for the kept checkpoint (a fixed subset; None = all)."""
    k_shot: int | None = None
    """Train on k examples per class (generation: k rows) of the target's train split, seeded by the run's
    seed (None: the task's own split, e.g. the -fs tasks' few-shot files)."""
    top_k: int = 2
    shots: int = 16
    """Examples per class best/linear/attention may look at (capped by the smallest class)."""
    batch_size: int = 16
    lr: float = 0.3
    """Prompt (and composer, head) learning rate of every arm."""
    model_lr: float = 5e-5
    """Backbone learning rate of full and joint (not tuned)."""
    prompt_length: int = 20
    full_prompt_length: int = 1
    kind: str = "prompt"
    """What every prompt arm tunes (sources included): prompt (virtual tokens) or prefix (keys and values in
    every attention layer). full stays model tuning with one virtual token; peft is PEFT's PromptTuning or
    PrefixTuning to match. Prefixes' library names carry "-prefix" after the backbone."""
    prefix_projection: int = 0
    """--kind prefix: train each prefix through an MLP of this width (0: none)."""
    mixture_steps: int = 1000
    """The mixture arm's source: steps of one prompt trained on every source task at once (seed 0)."""
    mixture_batch_size: int = 32
    mixture_temperature: float = 1000.0
    """Task i is drawn in proportion to n_i ** (1/T): the default samples the sources about uniformly."""
    mpt_steps: int = 1000
    """The mpt arm's source: steps of MPT's stage 1 over every source task (seed 0, default distillation weights)."""
    mpt_batch_size: int = 32
    mpt_temperature: float = 1000.0
    library: str = "runs/bench-library"
    runs: str | None = None
    data_dir: str | None = None
    figures: str | None = None
    """PNG folder; None = bench/figures (committed), or the run folder for the smoke tier."""
    threads: int | None = None
    retrain_sources: bool = False
    rerun: bool = False
    """Run every arm again even when its run folder holds a finished record made with the same settings."""
    time_budget: float | None = None
    """Minutes after which no new run starts (a started one finishes); None = no limit."""
    extra: dict = field(default_factory=dict)


# Every BenchConfig field either is in Bench.run_key's settings or is named here with how it reaches a run
# (tests/test_bench_transfer.py checks this): a new field must pick one, or stale records would be reused.
RUN_KEY_ELSEWHERE = {
    # given by the caller with each run
    "steps": "arg", "pair_steps": "arg", "prompt_length": "arg", "full_prompt_length": "arg", "top_k": "arg",
    "shots": "arg", "seeds": "arg",
    # reach a run through the init prompts' content hashes
    "sources": "hash", "source_steps": "hash", "source_max_eval": "hash", "retrain_sources": "hash",
    "library": "hash", "mixture_steps": "hash", "mixture_batch_size": "hash", "mixture_temperature": "hash",
    "mpt_steps": "hash", "mpt_batch_size": "hash", "mpt_temperature": "hash",
    # which runs, where they go, how they are reported: not what one run computes
    "tier": "none", "targets": "none", "arms": "none", "runs": "none", "figures": "none", "threads": "none",
    "rerun": "none", "time_budget": "none", "extra": "none",
    "data_dir": "none",  # where the data lives, not what it is
    "k_shot": "key",  # in the run key where set (Bench.run_key), absent from the records made without it
    "kind": "key", "prefix_projection": "key",  # likewise, where not the default
}


# -- small helpers ------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        # what the benchmarks write themselves (figures, results, README table) is not a change to the code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench/figures", ":!bench/RESULTS.md", ":!README.md"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


N_EXAMPLES = 3  # test generations a generation run's record keeps, for the report to print


def read_predictions(run_dir: Path, n: int) -> list[dict]:
    """The first n test generations a run wrote (train keeps them in predictions-test.jsonl), in split order."""
    try:
        lines = (run_dir / "predictions-test.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines[:n]]


class OutOfTime(Exception):
    """--time-budget is spent: no new run starts; the finished ones are kept for the next invocation."""


def default_runs(tier: str) -> str:
    """Where a tier's run folders go unless --runs says otherwise."""
    return f"runs/bench-transfer/{tier}"


def source_prompt_name(task: str, slug: str, source_steps: int) -> str:
    """A source prompt's library name."""
    return f"{task}-{slug}-{source_steps}"


SHARED_ARMS = ("mixture", "mpt")
"""The arms that start from one multi-task source trained on every source task (--shared of `train --multitask`)."""


def shared_save_prefix(shared: str, n_sources: int, slug: str, steps: int | str) -> str:
    """A multi-task source's --save-prefix (shared: mixture or mpt): its entry is this + "shared" (steps "*": a
    glob of every budget)."""
    return f"{shared}{n_sources}-{slug}-{steps}-"


def target_prompt_prefix(target: str, slug: str) -> str:
    """What the library names of the prompts made for one target (its own, the composed ones) start with."""
    return f"bench-{target}-{slug}-"


def arm_prompt_name(target: str, slug: str, arm: str, seed: int) -> str:
    """The library name of the prompt an arm makes for a target and seed (a composed init, say)."""
    return f"{target_prompt_prefix(target, slug)}{arm}-s{seed}"


def default_data_dir() -> str:
    return os.environ.get("PROMPT_COMPOSER_DATA") or str(ROOT.parent / "shared" / "data")


# -- the benchmark ------------------------------------------------------------------------------
class Bench:
    def __init__(self, cfg: BenchConfig):
        from composer.backbones import load_backbone
        from composer.demo import model_slug
        from composer.library import Library

        self.cfg = cfg
        self.slug = model_slug(cfg.model) + ("-prefix" if cfg.kind == "prefix" else "")  # prefixes' own names
        self.lib = Library(cfg.library)
        self.runs = Path(cfg.runs or default_runs(cfg.tier))
        self.bb = load_backbone(cfg.model)
        self.cache: dict[tuple, dict] = {}
        self.pair_steps = cfg.pair_steps or cfg.steps
        self.commit = git_commit()
        self.cpu = cpu_model()  # the same code and seed give other scores on another CPU: records name it
        self.cpu_isa = cpu_isa()  # and on the same CPU with another kernel level (ATEN_CPU_CAPABILITY)
        self.reused = 0  # finished runs taken from their run folders
        self.mixture: dict | None = None  # the mixture arm's source (train_shared)
        self.mpt: dict | None = None  # the mpt and peft-mpt arms' source (train_shared)
        self.deadline = None if cfg.time_budget is None else time.time() + 60 * cfg.time_budget

    def may_start(self, what: str) -> None:
        """Called before a run that is not in the records trains: past --time-budget, stop here."""
        if self.deadline is not None and time.time() > self.deadline:
            raise OutOfTime(f"--time-budget {self.cfg.time_budget:g} min spent before {what}")

    # -- finished runs are kept: a killed or split-up benchmark goes on where it stopped ----------
    def entry_sha(self, init: str) -> str | None:
        """A library init's content hash (its tensors), so a retrained source invalidates its runs."""
        if "library:" not in init:
            return None
        name = init.split("library:", 1)[1].split("@")[0]  # an MPT entry's library:NAME@TASK, a peer's peft-mpt:...
        return self.lib.content_sha(name) if self.lib.exists(name) else None

    def run_key(self, **what) -> dict:
        """What a finished run depends on, JSON-normalised (tuples become lists)."""
        c = self.cfg
        key = dict(what, model=c.model, batch_size=c.batch_size, lr=c.lr, model_lr=c.model_lr,
                   eval_every=c.eval_every, max_eval=c.max_eval, max_test=c.max_test)
        if c.k_shot is not None:  # only where set: the records made before the field stay valid
            key["k_shot"] = c.k_shot
        if "kind" not in key and c.kind != "prompt":  # likewise (full sets its own kind: it tunes the model)
            key["kind"] = c.kind
        if c.prefix_projection:
            key["prefix_projection"] = c.prefix_projection
        return json.loads(json.dumps(key, sort_keys=True))

    def stored(self, path: Path, key: dict) -> dict | None:
        if self.cfg.rerun:
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("key") != key:
            return None
        self.reused += 1
        return rec

    def store(self, path: Path, key: dict, rec: dict) -> dict:
        from composer.atomic import atomic_write_text

        rec = dict(rec, key=key, commit=self.commit, cpu=self.cpu, cpu_isa=self.cpu_isa)  # outside the key
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True, default=str))
        return rec

    # -- 1. sources -----------------------------------------------------------------------------
    def source_name(self, task: str) -> str:
        return source_prompt_name(task, self.slug, self.cfg.source_steps)

    def train_sources(self) -> dict:
        from composer.train import TrainConfig, prepare, train

        cfg, out = self.cfg, {}
        for task in cfg.sources:
            name = self.source_name(task)
            if self.lib.exists(name) and not cfg.retrain_sources:
                meta = self.lib.meta(name)
                say(f"[sources] reuse {name} from {self.lib.root}")
                metrics = meta.get("metrics") or {}
                out[task] = {"prompt": name, "reused": True, "dev": (metrics.get("dev") or {}).get("score"),
                             "initial": (metrics.get("initial") or {}).get("score")}  # entries before it: None
                continue
            self.may_start(f"source {task}")
            say(f"[sources] train {name} ({cfg.source_steps} steps)")
            run_dir = self.runs / "sources" / task
            shutil.rmtree(run_dir, ignore_errors=True)
            tc = TrainConfig(task=task, backbone=cfg.model, prompt_length=cfg.prompt_length, kind=cfg.kind,
                             prefix_projection=cfg.prefix_projection, steps=cfg.source_steps,
                             batch_size=cfg.batch_size, lr=cfg.lr,
                             eval_every=max(1, cfg.source_steps // 3), checkpoint_every=cfg.source_steps,
                             max_eval=cfg.source_max_eval, seed=0,
                             data_dir=cfg.data_dir, save=name, run_dir=str(run_dir))
            prep = prepare(tc, backbone=self.bb, library=self.lib)
            prep.dev, prep.test = prep.dev.subset(cfg.source_max_eval, 0), None  # sources need no test score
            r = train(tc, prepared=prep, library=self.lib, progress=False)
            out[task] = {"prompt": name, "reused": False, "initial": r["initial"]["score"], "dev": r["dev"]["score"],
                         "seconds": r["seconds"], "s_per_step": r["seconds"] / max(1, r["steps"])}
            say(f"          dev {r['initial']['score']:.3f} -> {r['dev']['score']:.3f} ({r['seconds']:.0f} s)")
        return out

    def train_shared(self, shared: str) -> dict:
        """A multi-task source trained once on every source task and reused from the library (SHARED_ARMS).
        mixture: one prompt on their mixed batches, each task its own head, kept at the step with the best mean
        dev score (SPoT's multi-task source). mpt: MPT's stage 1, one shared prompt and a rank-1 factor pair per
        source, distilled from the source prompts (the teachers, named by a graph of the sources alone); the
        entry is the last state."""
        from composer import graph as G_
        from composer.config import MultiTaskConfig
        from composer.multitask import SHARED, prepare_multitask, train_multitask

        cfg = self.cfg
        steps, batch, temperature = ((cfg.mixture_steps, cfg.mixture_batch_size, cfg.mixture_temperature)
                                     if shared == "mixture" else (cfg.mpt_steps, cfg.mpt_batch_size, cfg.mpt_temperature))
        prefix = shared_save_prefix(shared, len(cfg.sources), self.slug, steps)
        name = prefix + SHARED
        if self.lib.exists(name) and not cfg.retrain_sources:
            meta = self.lib.meta(name)
            tasks = (meta.get("provenance") or {}).get("tasks") or []
            if sorted(tasks) != sorted(cfg.sources):
                raise SystemExit(f"library entry {name} was trained on {','.join(tasks)}, not on --sources "
                                 f"{','.join(cfg.sources)}: give --retrain-sources or another --library")
            say(f"[sources] reuse {name} from {self.lib.root}")
            return self._shared_info(name, reused=True)
        self.may_start(f"the {shared} source")
        say(f"[sources] train {name} on {','.join(cfg.sources)} ({steps} steps)")
        run_dir = self.runs / "sources" / f"{shared}{steps}"
        shutil.rmtree(run_dir, ignore_errors=True)
        tasks: dict = {"tasks": list(cfg.sources)}
        if shared == "mpt":  # each source's teacher is its node's prompt
            graph = self.runs / "sources" / f"{shared}{steps}-graph.json"
            G_.save_graph(G_.from_dict({"name": f"bench-sources-{self.slug}", "backbone": cfg.model, "nodes": [
                {"name": s, "role": "source", "prompt": self.source_name(s)} for s in cfg.sources]}), graph)
            tasks = {"graph": str(graph)}
        mc = MultiTaskConfig(**tasks, backbone=cfg.model, prompt_length=cfg.prompt_length,
                             kind=cfg.kind, prefix_projection=cfg.prefix_projection, steps=steps,
                             batch_size=batch, lr=cfg.lr, sampling_temperature=temperature,
                             eval_every=max(1, steps // 4), max_eval=cfg.source_max_eval,
                             max_test=cfg.source_max_eval, seed=0, data_dir=cfg.data_dir, shared=shared,
                             save_prefix=prefix, run_dir=str(run_dir))
        mp = prepare_multitask(mc, backbone=self.bb, library=self.lib)
        for prep in mp.tasks.values():
            prep.test = None  # a source needs no test score
        r = train_multitask(mc, library=self.lib, progress=False, prepared=mp)
        info = self._shared_info(name, reused=False)
        dev = info["dev"] or {}
        say(f"          mean dev {sum(dev.values()) / max(1, len(dev)):.3f} at step {info['best_step']} "
            f"({r['seconds']:.0f} s)")
        return dict(info, seconds=r["seconds"], s_per_step=r["seconds"] / max(1, r["steps"]))

    def _shared_info(self, name: str, reused: bool) -> dict:
        """What the report says of a multi-task source's entry: its dev score per source, at step 0 and kept
        (mixture: at its best mean dev step; mpt: at its last step)."""
        m = self.lib.meta(name).get("metrics") or {}
        return {"prompt": name, "reused": reused, "dev": m.get("dev"), "initial": m.get("initial"),
                "dev_mean": m.get("dev_mean"), "best_step": m.get("best_step", m.get("steps"))}

    def peft_mpt_source(self):
        """The peft-mpt arm's prompt: PEFT's MultitaskPromptEmbedding, AVERAGE_SOURCE_TASKS from the mpt entry
        (exported once into the sources' run folder with `library export-peft`'s code)."""
        from peft_arm import PeftMPTSource

        from composer.peft_io import export_peft

        adapter = self.runs / "sources" / f"peft-{self.mpt['prompt']}"
        if not (adapter / "adapter_config.json").is_file():
            export_peft(self.lib, self.mpt["prompt"], adapter, overwrite=True)
        return PeftMPTSource(adapter, "AVERAGE_SOURCE_TASKS", self.bb.network.get_input_embeddings())

    # -- 2. one tuning run (memoised: the best arm and the seed-0 pair run of its source are one run) --
    def tune(self, task: str, init: str, seed: int, steps: int, run_name: str, mode: str = "prompt",
             prompt_length: int | None = None, save: str | None = None, key_init: str | None = None,
             lora_r: int | None = None, kind: str | None = None, prompt_source=None) -> dict:
        """One arm's tuning run, read back from its record where nothing it depends on changed. ``key_init``
        names the init in the records where ``init`` cannot (``prompt_source``: a callable building the prompt
        module, e.g. PEFT's, that then stands in for ``init``)."""
        from composer.train import TrainConfig, prepare, train

        cfg = self.cfg
        P = prompt_length or cfg.prompt_length
        kind = kind or cfg.kind
        key = (task, key_init or init, seed, steps, mode, P, lora_r, kind)
        keyed = {} if lora_r is None else {"lora_r": lora_r}  # keyed only when set: older records stay valid
        if kind != cfg.kind:  # the full arm's one virtual token under --kind prefix
            keyed["kind"] = kind
        if key in self.cache:
            return self.cache[key]
        run_dir = self.runs / task / run_name
        named = key_init or init
        rkey = self.run_key(arm="composer", task=task, init=named, init_sha=self.entry_sha(named), seed=seed,
                            steps=steps, mode=mode, prompt_length=P, **keyed)
        # the seed-0 random run also saves the target's prompt: reuse it only while that prompt is there
        rec = self.stored(run_dir / "record.json", rkey) if save is None or self.lib.exists(save) else None
        if rec is not None:
            self.cache[key] = rec
            return rec
        self.may_start(f"{task} {run_name}")
        shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
        projection = cfg.prefix_projection if kind == "prefix" else 0
        tc = TrainConfig(task=task, backbone=cfg.model, prompt_length=P, kind=kind, prefix_projection=projection,
                         init=init, mode=mode, unfreeze="all",
                         steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, model_lr=cfg.model_lr,
                         eval_every=cfg.eval_every, checkpoint_every=steps, max_eval=cfg.max_eval, seed=seed,
                         k_shot=cfg.k_shot, data_dir=cfg.data_dir, save=save, run_dir=str(run_dir),
                         **({} if lora_r is None else dict(adapter="lora", lora_r=lora_r, lora_alpha=2.0 * lora_r)))
        # joint mode changes backbone weights in place: give it its own copy
        bb = self.bb if mode == "prompt" else dataclasses.replace(self.bb,
                                                                 network=copy.deepcopy(self.bb.network))
        prep = prepare(tc, backbone=bb, library=self.lib,
                       prompt_source=None if prompt_source is None else prompt_source())
        prep.dev = prep.dev.subset(cfg.max_eval, 0)  # one dev subset for every arm and seed
        prep.test = prep.test.subset(cfg.max_test, 0) if prep.test is not None else None
        load0 = os.getloadavg()[0]
        r = train(tc, prepared=prep, library=self.lib, progress=False)
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]
        curve = read_curve(run_dir)
        for sub in ("checkpoint", "best"):  # a joint run's checkpoints hold the whole model: do not keep them
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        rec = {"init": named, "seed": seed, "mode": mode, "prompt_length": P, "steps": r["steps"],
               "initial": r["initial"]["score"], "dev": r["best"], "dev_last": curve[1][-1],
               "test": (r.get("test") or {}).get("score"), "best_step": r["best_step"], "curve": curve,
               "test_accuracy": (r.get("test") or {}).get("accuracy"),  # beside F1 or MCC: which classes it calls
               "seconds": r["seconds"], "s_per_step": r["seconds"] / max(1, r["steps"]), "load": load,
               "run_dir": str(run_dir), "metric": r["metric"]}
        if "metrics" in (r.get("test") or {}):  # a generation task: every metric, and a few generations
            rec["test_metrics"] = r["test"]["metrics"]
            rec["examples"] = read_predictions(run_dir, N_EXAMPLES)
        rec = self.cache[key] = self.store(run_dir / "record.json", rkey, rec)
        return rec

    def full_and_joint(self, target: str, seed: int, composed: dict[str, dict], add, skipped: dict[str, str]) -> None:
        """The arms that tune the backbone, where cfg.arms asks for them: full (every weight, from random, one
        virtual token) and joint (prompt + model from the composed init that scores best on dev before tuning;
        ties: after prompt tuning). ``add(arm, record)`` takes each finished run."""
        cfg = self.cfg
        if "full" in cfg.arms:
            add("full", self.tune(target, "random", seed, cfg.steps, f"full-s{seed}", mode="joint",
                                  prompt_length=cfg.full_prompt_length, kind="prompt"))
        if "joint" in cfg.arms:
            if not composed:
                skipped["joint"] = "no composed arm ran"
                return
            arm = max(composed, key=lambda a: (composed[a]["initial"], composed[a]["dev"]))
            rec = self.tune(target, composed[arm]["init"], seed, cfg.steps, f"joint-{arm}-s{seed}", mode="joint")
            add("joint", dict(rec, from_arm=arm))

    def peft(self, task: str, seed: int, steps: int, run_name: str) -> dict:
        """PEFT PromptTuning: same data order, init, loss, optimizer, schedule, clipping and evaluations."""
        from peft_arm import run_peft

        return run_peft(self, task, seed, steps, run_name)

    # -- 3. one target ------------------------------------------------------------------------------
    def graph_for(self, target: str, sources: dict) -> "object":
        """Sources and this target, the target's decomposition from glue-superglue.yaml, linked by transfer."""
        import yaml

        from composer import graph as G_

        base = yaml.safe_load((ROOT / "graphs" / "glue-superglue.yaml").read_text())
        stem = target.removesuffix("-fs").removesuffix("-fewglue")
        subs = [s for s in (base.get("decomposition") or {}).get(stem, []) if isinstance(s, str)]
        nodes = [{"name": s, "role": "source", "prompt": sources[s]["prompt"]} for s in self.cfg.sources]
        nodes.append({"name": target, "role": "target", "task": target})
        data = {"name": f"bench-{target}", "backbone": self.cfg.model, "nodes": nodes}
        if subs and all(s in sources for s in subs):
            data["decomposition"] = {target: subs}
        return G_.from_dict(data)

    def link_target(self, target: str, sources: dict) -> tuple["object", Path, dict[str, float]]:
        """The target's graph linked to its top-k sources by zero-shot transfer, saved in its run folder."""
        from composer import graph as G_
        from composer.transfer import transfer_matrix

        cfg = self.cfg
        src_names = [sources[s]["prompt"] for s in cfg.sources]
        say(f"[{target}] zero-shot transfer of {len(src_names)} source prompts")
        zs = transfer_matrix(self.lib, src_names, [target], data_dir=cfg.data_dir, max_examples=cfg.max_eval,
                             backbone=self.bb)
        transfer = {s: row[0] for s, row in zip(cfg.sources, zs["scores"])}
        G = self.graph_for(target, sources)
        G_.link(G, target, transfer, "transfer", cfg.top_k)
        graph_path = self.runs / target / "graph.json"
        graph_path.parent.mkdir(parents=True, exist_ok=True)
        G_.save_graph(G, graph_path)
        return G, graph_path, transfer

    def few_shots(self, task: str) -> int:
        from composer.taskdata import load_splits
        from composer.tasks import load_task

        labels = load_splits(load_task(task), data_dir=self.cfg.data_dir, splits=["train"], k_shot=0)["train"]["label"]
        return max(1, min(self.cfg.shots, min(Counter(labels).values())))

    def constant_scores(self, task: str) -> dict | None:
        """What predicting one class for every row scores, per class, on the arms' dev and test subsets: the
        floor a metric such as F1 puts under an untrained classifier (MRPC: always "yes" is F1 0.81). A
        reference printed beside the arms, never used to choose anything. None for generation and
        correlation metrics (a constant has no correlation)."""
        import numpy as np

        from composer.loop import encode_splits
        from composer.metrics import CORRELATION_METRICS, compute
        from composer.taskdata import load_splits
        from composer.tasks import load_task

        cfg, spec = self.cfg, load_task(task)
        if spec.is_generation or spec.metric in CORRELATION_METRICS:
            return None
        splits = load_splits(spec, data_dir=cfg.data_dir, k_shot=cfg.k_shot, seed=0)
        _, dev, test = encode_splits(spec, splits, self.bb.tokenizer)
        out = {}
        for split, enc, n in (("dev", dev, cfg.max_eval), ("test", test, cfg.max_test)):
            if enc is None:
                continue
            labels = enc.subset(n, 0).labels.numpy()
            out[split] = {}
            for c, name in enumerate(spec.labels):
                probs = np.zeros((len(labels), len(spec.labels)))
                probs[:, c] = 1.0
                out[split][str(name)] = compute(spec.metric, probs, labels)
        return out

    def run_target(self, target: str, sources: dict) -> dict:
        from composer import graph as G_
        from composer.compose import ComposeConfig, compose
        from composer.errors import ComposeError
        from composer.transfer import similarity_matrix

        cfg, t_start = self.cfg, time.time()
        src_names = [sources[s]["prompt"] for s in cfg.sources]
        G, graph_path, transfer = self.link_target(target, sources)
        graph_sha = hashlib.sha256(graph_path.read_bytes()).hexdigest()[:16]
        source_shas = {s: self.entry_sha(f"library:{sources[s]['prompt']}") for s in cfg.sources}  # once per target
        shots = self.few_shots(target)
        subtasks = [s for s, _ in G_.subtasks(G, target)]

        runs: dict[str, list[dict]] = {}
        composed_info: dict[str, list[dict]] = {}
        skipped: dict[str, str] = {}
        target_prompt = f"{target_prompt_prefix(target, self.slug)}random-{cfg.steps}"
        for seed in cfg.seeds:
            def add(arm: str, rec: dict):
                runs.setdefault(arm, []).append(rec)
                say(f"[{target}] seed {seed} {arm:<9} dev {rec['initial']:.3f} -> {rec['dev']:.3f}  test "
                    f"{fmt(rec['test'])}  ({rec['s_per_step']:.2f} s/step)")

            add("random", self.tune(target, "random", seed, cfg.steps, f"random-s{seed}",
                                    save=target_prompt if seed == cfg.seeds[0] else None))
            if "vocab" in cfg.arms:
                add("vocab", self.tune(target, "vocab", seed, cfg.steps, f"vocab-s{seed}"))
            if "peft" in cfg.arms:
                add("peft", self.peft(target, seed, cfg.steps, f"peft-s{seed}"))
            if "mixture" in cfg.arms:
                add("mixture", self.tune(target, f"library:{self.mixture['prompt']}", seed, cfg.steps,
                                         f"mixture{cfg.mixture_steps}-s{seed}"))  # budgets side by side
            if "mpt" in cfg.arms:  # the target's factors start at the sources' mean (PEFT's AVERAGE_SOURCE_TASKS)
                add("mpt", self.tune(target, f"library:{self.mpt['prompt']}@mean", seed, cfg.steps,
                                     f"mpt{cfg.mpt_steps}-s{seed}"))
            if "peft-mpt" in cfg.arms:
                add("peft-mpt", self.tune(target, "random", seed, cfg.steps, f"peft-mpt{cfg.mpt_steps}-s{seed}",
                                          key_init=f"peft-mpt:library:{self.mpt['prompt']}@mean",
                                          prompt_source=self.peft_mpt_source))
            composed = {}
            for arm in [a for a in COMPOSED if a in cfg.arms]:
                if arm == "concat" and not subtasks:
                    skipped[arm] = "the graph does not decompose this target"
                    continue
                strategy, method = ("linear", "powell") if arm == "linear-gf" else (arm, "lbfgs")
                name = arm_prompt_name(target, self.slug, arm, seed)
                t0 = time.time()
                ckey = self.run_key(arm=arm, graph=graph_sha, top_k=cfg.top_k, shots=shots, seed=seed,
                                    sources=source_shas)
                cpath = self.runs / target / "compose" / f"{arm}-s{seed}.json"
                info = self.stored(cpath, ckey) if self.lib.exists(name) else None
                if info is None:
                    self.may_start(f"{target} {arm} composition, seed {seed}")
                    try:
                        cr = compose(ComposeConfig(graph=str(graph_path), target=target, strategy=strategy,
                                                   top_k=cfg.top_k, metric="transfer", shots=shots, method=method,
                                                   seed=seed, backbone=cfg.model, data_dir=cfg.data_dir,
                                                   save=name),
                                     library=self.lib, backbone=self.bb)
                    except ComposeError as e:
                        skipped[arm] = str(e)
                        say(f"[{target}] {arm}: skipped ({e})")
                        continue
                    info = self.store(cpath, ckey, {"seed": seed, "candidates": cr["candidates"],
                                                    "weights": cr["weights"],
                                                    "compose_seconds": round(time.time() - t0, 2)})
                cr = info
                composed_info.setdefault(arm, []).append(info)
                if arm == "best":  # the chosen source's own prompt: the same run as its transferability run
                    i = max(range(len(cr["weights"])), key=lambda j: cr["weights"][j])
                    src = cr["candidates"][i]
                    rec = self.tune(target, f"library:{sources[src]['prompt']}", seed, cfg.steps,
                                    f"from-{src}-s{seed}")
                    rec = dict(rec, chosen=src)
                else:
                    rec = self.tune(target, f"library:{name}", seed, cfg.steps, f"{arm}-s{seed}")
                composed[arm] = rec
                add(arm, rec)
            self.full_and_joint(target, seed, composed, add, skipped)

        # transferability: each source as init, the first seed, a short budget, against random
        seed0 = cfg.seeds[0]
        base = self.tune(target, "random", seed0, self.pair_steps, f"pair-random-s{seed0}")
        pairs = {}
        for s in cfg.sources:
            r = self.tune(target, f"library:{sources[s]['prompt']}", seed0, self.pair_steps, f"pair-from-{s}-s{seed0}")
            pairs[s] = {"dev": r["dev"], "dev_last": r["dev_last"], "test": r["test"], "initial": r["initial"],
                        "gain_dev": r["dev"] - base["dev"], "gain_dev_last": r["dev_last"] - base["dev_last"],
                        "gain_test": None if r["test"] is None or base["test"] is None else r["test"] - base["test"]}
            say(f"[{target}] from {s:<8} gain dev {pairs[s]['gain_dev']:+.3f}  test {fmt(pairs[s]['gain_test'])}")
        sims = {"transfer": transfer}
        for metric in ("cos-avg", "cos-tok", "on"):
            row = similarity_matrix(self.lib, [target_prompt], metric, backbone=self.bb, others=src_names)[0]
            sims[metric] = {s: float(v) for s, v in zip(cfg.sources, row)}
        return {"runs": runs, "composed": composed_info, "skipped": skipped, "shots": shots,
                "subtasks": subtasks, "transfer": transfer, "similarity": sims, "pairs": pairs,
                "pair_steps": self.pair_steps, "target_prompt": target_prompt, "graph": str(graph_path),
                "constant": self.constant_scores(target),
                "seconds": round(time.time() - t_start, 1)}


# -- main ---------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    tier = ap.add_mutually_exclusive_group(required=True)
    for name in TIERS:
        tier.add_argument(f"--{name}", dest="tier", action="store_const", const=name, help=f"the {name} tier")
    def lst(s: str) -> tuple[str, ...]:
        return tuple(x for x in s.split(",") if x)

    ap.add_argument("--sources", type=lst, help="comma-separated source tasks")
    ap.add_argument("--targets", type=lst, help="comma-separated target tasks (few-shot specs, e.g. rte-fs)")
    ap.add_argument("--arms", type=lst, help=f"comma-separated arms from {','.join(ARMS)} (random always runs)")
    ap.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 0,1,2")
    for f in ("source-steps", "steps", "pair-steps", "eval-every", "source-max-eval", "max-eval", "max-test",
              "top-k", "shots", "batch-size", "prompt-length", "full-prompt-length", "prefix-projection",
              "mixture-steps", "mixture-batch-size", "mpt-steps", "mpt-batch-size"):
        ap.add_argument(f"--{f}", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--model-lr", type=float)
    ap.add_argument("--mixture-temperature", type=float,
                    help="mixture arm: source i drawn in proportion to n_i ** (1/T) (default 1000: about uniform)")
    ap.add_argument("--mpt-temperature", type=float, help="mpt arm's stage 1: the same (default 1000)")
    ap.add_argument("--kind", choices=("prompt", "prefix"),
                    help="what the prompt arms tune: prompt (default) or prefix (deep prompts; try --lr 0.01)")
    ap.add_argument("--model", help="backbone (default minilm)")
    ap.add_argument("--library", help="library of source prompts, reused across runs (default runs/bench-library)")
    ap.add_argument("--runs", help="run folders (default runs/bench-transfer/TIER)")
    ap.add_argument("--data-dir", help="data folder (default $PROMPT_COMPOSER_DATA, else ../shared/data)")
    ap.add_argument("--figures", help="PNG folder (default bench/figures; smoke: RUNS/figures)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--retrain-sources", action="store_true", help="train source prompts even when in the library")
    ap.add_argument("--rerun", action="store_true",
                    help="run every arm again, even when its run folder holds a finished record with these settings")
    ap.add_argument("--time-budget", type=float, metavar="MINUTES",
                    help="start no new run after this many minutes (a started run finishes); exit 3, and the same "
                         "command goes on from the finished runs")
    ap.add_argument("--out-json", help="results JSON (default RUNS/results.json)")
    ap.add_argument("--out-md", help="also write the markdown section to this file")
    args = ap.parse_args(argv)
    values = dict(TIERS[args.tier], tier=args.tier)
    for f in dataclasses.fields(BenchConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "tier":
            values[f.name] = v
    values["data_dir"] = values.get("data_dir") or default_data_dir()
    cfg = BenchConfig(**values)
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {', '.join(bad)}: use {', '.join(ARMS)}")
    if "peft-mpt" in cfg.arms and cfg.kind != "prompt":
        ap.error("--arms peft-mpt: PEFT's MultitaskPromptTuning is an input-level prompt; drop it under --kind prefix")
    if "joint" in cfg.arms and not any(a in COMPOSED for a in cfg.arms):
        ap.error("--arms: joint starts from a composed init; add one of " + ", ".join(COMPOSED))
    if not Path(cfg.data_dir).is_dir():
        ap.error(f"--data-dir {cfg.data_dir} does not exist; point it (or $PROMPT_COMPOSER_DATA) at ../shared/data")
    return cfg, args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    command = "python bench/transfer.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    load_start = round(os.getloadavg()[0], 2)
    bench = Bench(cfg)
    try:
        sources = bench.train_sources()
        if "mixture" in cfg.arms:
            bench.mixture = bench.train_shared("mixture")
        if "mpt" in cfg.arms or "peft-mpt" in cfg.arms:
            bench.mpt = bench.train_shared("mpt")
        targets = {t: bench.run_target(t, sources) for t in cfg.targets}
    except OutOfTime as e:
        say(f"stopped: {e}; {time.time() - t0:.0f} s. The finished runs are kept: run the same command to go on.")
        raise SystemExit(3) from None
    import peft
    import transformers

    records = [r for v in targets.values() for recs in v["runs"].values() for r in recs]
    res = {"command": command, "commit": git_commit(), "config": dataclasses.asdict(cfg),
           "machine": {"cpu": bench.cpu, "cpu_isa": bench.cpu_isa, "cpu_count": os.cpu_count(),
                       "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "python": platform.python_version(),
                       "load_start": load_start, "load_end": round(os.getloadavg()[0], 2)},
           "sources": sources, "mixture": bench.mixture, "mpt": bench.mpt, "targets": targets, "pair_steps": bench.pair_steps,
           "summary": {t: summarise_target(v) for t, v in targets.items()},
           "transferability": correlations(targets), "wall_s": round(time.time() - t0, 1),
           "reused_runs": bench.reused,
           "run_commits": sorted({r.get("commit", "unknown").split()[0] for r in records}),
           "run_cpus": sorted({cpu_label(r.get("cpu", "an unrecorded CPU"), r.get("cpu_isa"))
                               for r in records})}

    figs = Path(cfg.figures) if cfg.figures else (bench.runs / "figures" if cfg.tier == "smoke"
                                                  else ROOT / "bench" / "figures")
    fig_paths = {t: figure_target(t, targets[t], res["summary"][t], figs / f"transfer-{cfg.tier}-{t}.png")
                 for t in targets}
    if len(cfg.sources) > 1:
        import numpy as np

        from composer.plots import similarity_heatmap

        gain = np.array([[targets[t]["pairs"][s]["gain_test"] if targets[t]["pairs"][s]["gain_test"] is not None
                          else np.nan for t in targets] for s in cfg.sources])
        fig_paths[None] = similarity_heatmap(gain, list(cfg.sources), list(targets),
                                             figs / f"transfer-{cfg.tier}-gain.png",
                                             title=f"test gain over random init ({bench.pair_steps} steps)",
                                             cbar_label="test score gain", centre=0.0)
        res["gain_figure"] = str(fig_paths[None])
    md_dir = Path(args.out_md).resolve().parent if args.out_md else (ROOT / "bench")

    def fig_rel(t):
        return os.path.relpath(Path(fig_paths[t]).resolve(), md_dir)

    text = markdown(res, fig_rel)
    from composer.atomic import atomic_write_text

    out_json = Path(args.out_json or bench.runs / "results.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_json, json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out_md), text)
    print(text)
    say(f"results: {out_json}; figures: {', '.join(str(p) for p in fig_paths.values())}; {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
