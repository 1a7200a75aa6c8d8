"""The report of bench/transfer.py: per-target summaries, the claims, transferability, figures, markdown.

Pure functions of the results dict that bench/transfer.py builds (and keeps in its results JSON), so a report
can be rewritten from the kept runs without running anything.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path


ARMS = ("random", "vocab", "peft", "mixture", "mpt", "peft-mpt", "best", "average", "linear", "linear-gf", "attention", "concat",
        "full", "joint")
COMPOSED = ("best", "average", "linear", "linear-gf", "attention", "concat")
SIM_METRICS = ("cos-avg", "cos-tok", "on", "transfer")


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(m: float | None, sd: float | None = None, digits: int = 3) -> str:
    if m is None:
        return "–"
    if isinstance(m, float) and math.isnan(m):
        return "undefined"
    m, sd = m + 0.0, None if sd is None else sd + 0.0  # no "-0.000"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


# -- analysis (pure: results dict in, numbers out) -----------------------------------------------
def steps_to_reach(curve, level: float) -> int | None:
    for s, v in zip(*curve):
        if v >= level - 1e-9:
            return s
    return None


def summarise_target(t: dict) -> dict:
    """Per arm: dev/test mean and spread, steps to random's final dev score, gap closed (dev and test)."""
    runs = t["runs"]
    base = {r["seed"]: r for r in runs["random"]}
    out = {}
    for arm, recs in runs.items():
        reach = [steps_to_reach(r["curve"], base[r["seed"]]["dev"]) for r in recs]
        out[arm] = {k: mean_sd([r[k] for r in recs]) for k in ("initial", "dev", "test", "s_per_step")}
        out[arm]["reach"] = reach
        out[arm]["n"] = len(recs)
    for split in ("dev", "test"):
        lo, lo_sd = out["random"][split]
        hi, hi_sd = out.get("full", {}).get(split, (None, None))
        for arm in out:
            m = out[arm][split][0]
            ok = None not in (lo, hi, m) and hi - lo > gap_floor(lo_sd, hi_sd)
            out[arm][f"gap_{split}"] = (m - lo) / (hi - lo) if ok else None
    return out


def crowded(runs: dict, threads: int) -> list[str]:
    """Runs timed while other work shared the cores: 1-minute load average above threads + 1 at their start or
    end (records from before the load was kept say nothing)."""
    return [f"{arm} seed {r['seed']} (load {r['load'][0]:g}/{r['load'][1]:g})" for arm, recs in runs.items()
            for r in recs if max(r.get("load") or [0]) > threads + 1]


def gap_floor(*sds: float | None) -> float:
    """How far full tuning must beat random for "gap closed" to mean anything: the larger seed spread.

    (arm - random) / (full - random) over a gap inside the seeds' noise is noise divided by noise (a
    0.006 gap turns a 0.2 drop into "-30 gaps"), so such a target gets no gap-closed number at all.
    """
    return max([sd for sd in sds if sd is not None], default=1e-9)


def correlations(targets: dict) -> dict:
    """Spearman of each similarity metric with the gain, pooled over every source-target pair."""
    from composer.similarity import spearman

    out = {}
    for gain in ("gain_dev", "gain_dev_last", "gain_test"):
        rows = {}
        for metric in SIM_METRICS:
            xs, ys = [], []
            for t in targets.values():
                for s, p in t["pairs"].items():
                    if p[gain] is not None:
                        xs.append(t["similarity"][metric][s])
                        ys.append(p[gain])
            rows[metric] = {"rho": spearman(xs, ys) if len(xs) >= 2 else None, "n": len(xs)}
        out[gain] = rows
    return out


def mean_gap(summary: dict, arm: str) -> tuple[float | None, int]:
    """An arm's mean gap closed on test over the targets that have one, and how many those are."""
    gaps = [summary[t][arm]["gap_test"] for t in summary
            if arm in summary[t] and summary[t][arm]["gap_test"] is not None]
    return (statistics.fmean(gaps) if gaps else None), len(gaps)


def claims(summary: dict) -> list[str]:
    """The issue's claims, checked on test means (one line each; 'n/a' where an arm did not run)."""
    lines = []
    targets = list(summary)
    comp = [a for a in COMPOSED if all(a in summary[t] for t in targets)]
    for a in comp:
        wins = [t for t in targets if None not in (summary[t][a]["test"][0], summary[t]["random"]["test"][0])
                and summary[t][a]["test"][0] > summary[t]["random"]["test"][0]]
        gap, n_gap = mean_gap(summary, a)
        fast = []
        for t in targets:
            rnd = [x for x in summary[t]["random"]["reach"]]
            arm = summary[t][a]["reach"]
            fast.append(all(x is not None and r is not None and x <= r / 3 for x, r in zip(arm, rnd)))
        lines.append(f"- {a}: beats random on test on {len(wins)}/{len(targets)} targets; mean gap closed (test) "
                     f"{fmt(gap, digits=2)} over {n_gap} targets; "
                     f"reaches random's final dev score in at most a third of random's steps on "
                     f"{sum(fast)}/{len(targets)} targets")
    if all("joint" in summary[t] and "full" in summary[t] for t in targets):
        ok = [t for t in targets if (summary[t]["joint"]["test"][0] or 0) >= (summary[t]["full"]["test"][0] or 0)]
        lines.append(f"- joint from the best composed init >= full model tuning on test on {len(ok)}/{len(targets)} "
                     "targets")
    if all("peft" in summary[t] for t in targets):
        acc = [t for t in targets if (summary[t]["random"]["test"][0] or 0) >= (summary[t]["peft"]["test"][0] or 0)]
        spd = [t for t in targets if summary[t]["random"]["s_per_step"][0] <= summary[t]["peft"]["s_per_step"][0]]
        lines.append(f"- our random-init prompt tuning >= PEFT PromptTuning on test on {len(acc)}/{len(targets)} "
                     f"targets, and no slower per step on {len(spd)}/{len(targets)} (wall time per step, evals "
                     "included)")
    return lines


# -- report ---------------------------------------------------------------------------------------
def figure_target(target: str, t: dict, s: dict, path: Path) -> Path:
    """Learning curves (dev, mean over seeds), final test score (mean, spread), gap closed (test)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arms = list(t["runs"])
    colours = {a: matplotlib.colormaps["tab10"](i % 10) for i, a in enumerate(arms)}
    colours["random"] = "black"
    fig = Figure(figsize=(15, 4.4))
    fig.suptitle(f"{target}: {len(t['runs']['random'])} seed(s), {t['runs']['random'][0]['steps']} steps per arm",
                 fontsize=12, y=1.04)
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for a in arms:
        curves = [r["curve"] for r in t["runs"][a]]
        steps = curves[0][0]
        vals = np.mean([c[1] for c in curves if c[0] == steps], axis=0)
        style = dict(color="black", ls="--", lw=1.8) if a == "random" else dict(color=colours[a], lw=1.3)
        ax1.plot(steps, vals, marker="o", ms=2.5, label=a, **style)
    ax1.set(xlabel="training step", ylabel=f"dev {t['runs']['random'][0]['metric']}",
            title="dev score while tuning (mean over seeds)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, frameon=False, ncols=2)
    x = np.arange(len(arms))
    means = [s[a]["test"][0] if s[a]["test"][0] is not None else np.nan for a in arms]
    sds = [s[a]["test"][1] or 0.0 for a in arms]
    ax2.bar(x, means, yerr=sds if any(sds) else None, color=[colours[a] for a in arms], capsize=3)
    ax2.axhline(s["random"]["test"][0] or 0, color="black", ls="--", lw=1)
    ax2.set_xticks(x, arms, rotation=45, ha="right", fontsize=8)
    finite = [m for m in means if not np.isnan(m)]
    if finite:
        ax2.set_ylim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05) if max(finite) <= 1 else None)
    ax2.set(title="test score, kept checkpoint (mean ± sd)")
    gaps = [s[a]["gap_test"] if s[a]["gap_test"] is not None else np.nan for a in arms]
    ax3.bar(x, gaps, color=[colours[a] for a in arms])
    ax3.axhline(0, color="black", lw=0.8)
    ax3.axhline(1, color="grey", ls=":", lw=1)
    ax3.set_xticks(x, arms, rotation=45, ha="right", fontsize=8)
    if all(np.isnan(g) for g in gaps):
        ax3.text(0.5, 0.5, "no gap to close: full model tuning does not\nbeat random-init prompt tuning by more\nthan a seed's spread",
                 transform=ax3.transAxes, ha="center", va="center", fontsize=9, color="dimgrey")
    ax3.set(title="gap closed on test: (arm − random) / (full − random)")
    for ax in (ax1, ax2, ax3):
        ax.spines[["top", "right"]].set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", facecolor="white")
    return path


def reach_text(reach: list) -> str:
    got = [r for r in reach if r is not None]
    if not got:
        return "never"
    text = f"{statistics.fmean(got):.0f}"
    return text if len(got) == len(reach) else f"{text} ({len(reach) - len(got)}/{len(reach)} never)"


def mixture_text(m: dict, c: dict) -> str:
    """The mixture arm's source: one prompt trained on every source task at once, its dev score per task."""
    dev = m.get("dev") or {}
    return (f" The mixture arm starts from `{m['prompt']}`, one prompt trained on all {len(dev) or len(c['sources'])} "
            f"source tasks at once ({c['mixture_steps']} steps, mixed batches of {c['mixture_batch_size']}, "
            f"temperature {c['mixture_temperature']:g}, lr {c['lr']}, each task its own head; kept at step "
            f"{m.get('best_step')}, the best mean dev score{', reused' if m.get('reused') else ''}): "
            + ", ".join(f"{s} {fmt(dev[s])}" for s in c["sources"] if s in dev)  # its tasks are the sources
            + " (dev score per task).")


def mpt_text(m: dict, c: dict) -> str:
    """The mpt arms' source: MPT's stage 1 over every source task, its dev score per task at its last step."""
    dev, initial = m.get("dev") or {}, m.get("initial") or {}
    return (f" The mpt arm starts from `{m['prompt']}`, MPT's stage 1 over all {len(c['sources'])} sources "
            f"({c['mpt_steps']} steps, mixed batches of {c['mpt_batch_size']}, temperature {c['mpt_temperature']:g}, "
            f"lr {c['lr']}; one shared prompt and a rank-1 factor pair per source, distilled from the source "
            "prompts by logits KL and hidden-state MSE; the last state kept"
            f"{', reused' if m.get('reused') else ''}); the target starts at the shared prompt with the sources' "
            "mean factors, and peft-mpt at PEFT's own AVERAGE_SOURCE_TASKS init from the same entry. Dev score "
            "per source at step 0 -> kept: "
            + ", ".join(f"{s} {fmt(initial.get(s))} -> {fmt(dev[s])}" for s in c["sources"] if s in dev) + ".")


def markdown(res: dict, fig_rel) -> str:
    c = res["config"]
    summ = res["summary"]
    lines = [
        f"## Transfer benchmark ({c['tier']} tier)", "",
        f"Command: `{res['command']}`  ",
        f"Commit: `{res['commit']}`  ",
        f"Machine: {res['machine']['cpu']}"
        + (f" ({res['machine']['cpu_isa']})" if res['machine'].get('cpu_isa') else "")
        + f", {res['machine']['cpu_count']} cores, torch {res['machine']['torch']} "
        f"with {res['machine']['threads']} threads; load average {res['machine']['load_start']} at the start, "
        f"{res['machine']['load_end']} at the end (other jobs share the cores). Wall time {res['wall_s']:.0f} s.  ",
        f"Seeds: {', '.join(map(str, c['seeds']))} (training seed of every target arm: init, batch order, dropout, "
        "composer few-shot sample; the few-shot data split itself is the task's fixed one).", "",
    ]
    if res.get("reused_runs"):
        lines[-1:-1] = [
            f"Resumed: {res['reused_runs']} finished runs (and compositions) were read back from their run folders, "
            f"made by earlier invocations of this command; the runs come from commit(s) "
            + ", ".join(f"`{x[:10]}`" for x in res.get("run_commits", []))
            + (f", made on {'; '.join(res['run_cpus'])} (the same code and seeds give other scores on another "
               "CPU)" if res.get("run_cpus") else "")
            + ". Wall time and load cover this "
            "invocation only, the s/step columns are each run's own.  "]
    lines += [
        f"Backbone `{c['model']}` (frozen except in full and joint), "
        + (f"**prefixes** (keys and values in every attention layer; sources too; peft is PEFT's PrefixTuning) of "
           f"length {c['prompt_length']}" + (f", reparameterised through an MLP of width {c['prefix_projection']}"
                                             if c.get("prefix_projection") else "")
           if c.get("kind") == "prefix" else f"prompt length {c['prompt_length']}")
        + ". Sources "
        f"trained {c['source_steps']} steps each (seed 0, full training split, batch {c['batch_size']}, lr {c['lr']}): "
        + ", ".join(f"{s} {fmt(v.get('dev'))}" + (" (reused)" if v.get("reused") else "")
                    for s, v in res["sources"].items()) + " (source dev score)."
        + (mixture_text(res["mixture"], c) if res.get("mixture") else "")
        + (mpt_text(res["mpt"], c) if res.get("mpt") else ""),
        f"Every arm on a target: {c['steps']} steps, batch {c['batch_size']}, prompt lr {c['lr']} (linear decay, "
        f"6% warm-up), model lr {c['model_lr']} for full and joint (not tuned); dev evaluated every "
        f"{c['eval_every']} steps on at most {c['max_eval']} examples, the best dev checkpoint kept (the init "
        f"included); test = the kept checkpoint on at most {c['max_test'] or 'all'} test examples (a fixed subset). "
        f"Composition: top-{c['top_k']} sources by zero-shot transfer; best/linear/attention look at up to "
        f"{c['shots']} training examples per class; joint starts from the composed init with the best dev score at "
        f"step 0; full trains every backbone weight with {c['full_prompt_length']} random virtual token(s).", "",
        "### Summary: test score per target (mean ± sd over seeds)", "",
        "Gap closed = (arm − random) / (full − random), given only where full model tuning beats random-init "
        "prompt tuning by more than a seed's spread (the larger sd of the two); '–' elsewhere.", "",
    ]
    targets = list(summ)
    arms = [a for a in ARMS if any(a in summ[t] for t in targets)]
    lines += ["| arm | " + " | ".join(targets) + " | mean gap closed (test) |",
              "|---|" + "---:|" * (len(targets) + 1)]
    for a in arms:
        cells = [fmt(*summ[t][a]["test"]) if a in summ[t] else "–" for t in targets]
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {fmt(mean_gap(summ, a)[0], digits=2)} |")
    lines += ["", "Claims of issue 6, checked on these numbers:", ""] + claims(summ) + [""]
    for t in targets:
        tr = res["targets"][t]
        s = summ[t]
        metric = tr["runs"]["random"][0]["metric"]
        lines += [f"### {t} ({metric})", "",
                  "| arm | dev at step 0 | dev (kept ckpt) | test | steps to random's final dev | "
                  "gap closed (dev) | gap closed (test) | s/step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for a in [a for a in ARMS if a in s]:
            r = s[a]
            lines.append(f"| {a} | {fmt(*r['initial'])} | {fmt(*r['dev'])} | {fmt(*r['test'])} | "
                         f"{reach_text(r['reach'])} | {fmt(r['gap_dev'], digits=2)} | {fmt(r['gap_test'], digits=2)} | "
                         f"{fmt(r['s_per_step'][0], digits=2)} |")
        notes = [f"{a}: {why}" for a, why in tr["skipped"].items()]
        comp = []
        for a, infos in tr["composed"].items():
            i0 = infos[0]
            comp.append(f"{a} [{', '.join(f'{n} {w + 0.0:.2f}' for n, w in zip(i0['candidates'], i0['weights']))}]")
        joint = [r.get("from_arm") for r in tr["runs"].get("joint", [])]
        lines += ["", "Zero-shot transfer (dev): " + ", ".join(f"{k} {v:.3f}" for k, v in tr["transfer"].items())
                  + f". Composition weights (seed {res['config']['seeds'][0]}): " + ("; ".join(comp) or "–")
                  + (f". joint started from: {', '.join(joint)}" if joint else "")
                  + (f". Best arm chose: {', '.join(r.get('chosen', '?') for r in tr['runs'].get('best', []))}"
                     if tr["runs"].get("best") else "") + "."]
        if tr.get("constant"):
            lines += ["Predicting one class for every row (no training; a reference, not an arm): " + "; ".join(
                f"{split} " + ", ".join(f"always {c!r} {v:.3f}" for c, v in by.items())
                for split, by in tr["constant"].items()) + "."]
        if notes:
            lines += ["Not run: " + "; ".join(notes) + "."]
        busy = crowded(tr["runs"], res["machine"]["threads"])
        if busy:
            lines += [f"Timed with other work on the cores (load above {res['machine']['threads'] + 1}), so their "
                      "s/step is not a clean timing: " + ", ".join(busy) + "."]
        lines += ["", f"![{t}]({fig_rel(t)})", ""]
    tf = res["transferability"]
    srcs = list(res["sources"])
    lines += ["### Transferability", "",
              f"Gain = target score after {res['pair_steps']} steps of prompt tuning from the source prompt minus the "
              f"same run from random (seed {c['seeds'][0]}). Similarity between the source prompt and the target's "
              f"random-init tuned prompt (cos-avg, cos-tok, on) or the source prompt's zero-shot dev score on the "
              "target (transfer). The kept checkpoint includes the init, so zero-shot transfer enters the kept-"
              "checkpoint gains by construction; 'end of budget' is the last evaluation instead. 'undefined': the "
              "gains (or similarities) are all equal.", "",
              "| metric | ρ, gain on dev (kept ckpt) | ρ, gain on dev (end of budget) "
              "| ρ, gain on test (kept ckpt) |",
              "|---|---:|---:|---:|"]
    for m in SIM_METRICS:
        cells = [tf[g][m] for g in ("gain_dev", "gain_dev_last", "gain_test")]
        lines.append(f"| {m} | " + " | ".join(f"{fmt(x['rho'], digits=2)} (n={x['n']})" for x in cells) + " |")
    lines += ["", "Gain on test (rows: sources; columns: targets):", "",
              "| source | " + " | ".join(targets) + " |", "|---|" + "---:|" * len(targets)]
    for src in srcs:
        lines.append(f"| {src} | " + " | ".join(fmt(res["targets"][t]["pairs"][src]["gain_test"]) for t in targets)
                     + " |")
    if res.get("gain_figure"):
        lines += ["", f"![gain]({fig_rel(None)})"]
    return "\n".join(lines) + "\n"
