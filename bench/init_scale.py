"""Is it the init's scale? Tune the full tier's linear inits, and random inits, rescaled to a source's size.

bench/prompt_scale.py finds that tuned prompts are large (15-29 per token on minilm, against 1.07 for a
word embedding) while the linear mixtures of bench/transfer.py start at 0.04-5.9, the size of a random
init. This probe tunes, for each seed of the full tier, on one target:

  linear-scaled   the full tier's linear init (library entry bench-TARGET-minilm-linear-sSEED), multiplied
                  so that its mean per-token norm equals the mean of its candidate sources' norms
  random-scaled   the random init of that seed multiplied to the same norm (the control: does size alone
                  do it?)

with exactly the protocol of the full tier's arms (Bench.tune: 100 steps, batch 16, lr 0.3, dev every 10
steps, best dev checkpoint kept, the same dev and test subsets), and prints them beside the full tier's
random and linear records for the same target and seeds.

    python bench/init_scale.py --target cr-fs --out-md runs/init-scale-cr-fs.md

Needs the full tier's records and library entries for the target (bench/transfer.py --full --targets T).
Runs go to runs/bench-transfer/init-scale/TARGET, the rescaled prompts into the same library.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prompt_scale import row_norm  # noqa: E402
from transfer import (  # noqa: E402
    TIERS,
    Bench,
    BenchConfig,
    arm_prompt_name,
    default_data_dir,
    git_commit,
    say,
)
from transfer_report import fmt, mean_sd  # noqa: E402

ARMS = ("random", "linear", "random-scaled", "linear-scaled")


def scaled_inits(bench: Bench, target: str, seed: int) -> tuple[dict[str, str], dict[str, float]]:
    """Save the two rescaled inits of one seed in the library -> ({arm: init spec}, {arm: init norm})."""
    from composer.prompts import init_prompt

    lib, name = bench.lib, arm_prompt_name(target, bench.slug, "linear", seed)
    if not lib.exists(name):
        raise SystemExit(f"{name} is not in {lib.root}: run bench/transfer.py --full --targets {target} first")
    entry = lib.load(name)
    sources = entry.meta["provenance"]["prompts"]
    size = sum(row_norm(lib.load(s).prompt) for s in sources) / len(sources)
    random, _ = init_prompt("random", bench.cfg.prompt_length, bench.bb, seed=seed)
    out, norms = {}, {"random": row_norm(random), "linear": row_norm(entry.prompt)}
    for arm, prompt in (("linear-scaled", entry.prompt), ("random-scaled", random)):
        scaled = prompt.float() * (size / row_norm(prompt))
        meta = {k: entry.meta.get(k) for k in ("task", "backbone", "family", "head")}
        meta["provenance"] = {"rescaled_from": name if arm == "linear-scaled" else f"random seed {seed}",
                              "to_norm": size, "sources": sources}
        scaled_name = arm_prompt_name(target, bench.slug, arm, seed)
        lib.save(scaled_name, scaled, meta)
        out[arm] = f"library:{scaled_name}"
        norms[arm] = row_norm(scaled)
    return out, norms


def full_tier_record(target: str, arm: str, seed: int) -> dict:
    path = ROOT / "runs" / "bench-transfer" / "full" / target / f"{arm}-s{seed}" / "record.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise SystemExit(f"no full-tier record at {path}: run bench/transfer.py --full --targets {target} first")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="cr-fs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out-md", help="also write the table to this file")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = BenchConfig(**dict(TIERS["full"], tier="full", targets=(args.target,), seeds=tuple(seeds),
                             data_dir=default_data_dir(), runs="runs/bench-transfer/init-scale"))
    t0 = time.time()
    bench = Bench(cfg)
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    norms: dict[str, list[float]] = {a: [] for a in ARMS}
    for seed in seeds:
        for arm in ("random", "linear"):
            runs[arm].append(full_tier_record(args.target, arm, seed))
        inits, seed_norms = scaled_inits(bench, args.target, seed)
        for arm in ARMS:
            norms[arm].append(seed_norms[arm])
        for arm, init in inits.items():
            r = bench.tune(args.target, init, seed, cfg.steps, f"{arm}-s{seed}")
            say(f"[{args.target}] seed {seed} {arm:<13} dev {r['initial']:.3f} -> {r['dev']:.3f}  test {r['test']:.3f}")
            runs[arm].append(r)
    lines = [f"Command: `python bench/init_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
             f"Commit: `{git_commit()}`; wall time {time.time() - t0:.0f} s; seeds {args.seeds}; "
             f"random and linear rows are the full tier's records.", "",
             "| arm | init norm (per token) | dev at step 0 | dev (kept ckpt) | test |", "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        cells = [fmt(*mean_sd(norms[arm]), digits=2)] + [fmt(*mean_sd([r[k] for r in runs[arm]]))
                                                         for k in ("initial", "dev", "test")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out_md:
        from composer.atomic import atomic_write_text

        atomic_write_text(Path(args.out_md), text + "\n")


if __name__ == "__main__":
    main()
