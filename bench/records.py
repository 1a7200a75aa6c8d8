"""Keep a benchmark's finished runs in git, so a tier split over several machines or sessions goes on.

bench/transfer.py reuses a finished run when its run folder holds a record made with the same settings
(and, for runs from a library prompt, the same prompt tensors). Those folders live under runs/, which is
not in git. This script copies what the reuse needs, and nothing else, to bench/records/TIER/ and back:

    TARGET/graph.json, TARGET/compose/*.json, TARGET/RUN/record.json    the measurements (JSON)
    library/NAME/                                                          the prompts they start from

The library part is the tier's source prompts and the prompts composed for the saved targets (tens of KB
each; safetensors and JSON, no pickle). Checkpoints, metrics logs and the data are never copied.

    python bench/records.py save --tier full --targets boolq-fs    # runs/ -> bench/records/full/
    python bench/records.py restore --tier full                     # bench/records/full/ -> runs/
    python bench/transfer.py --full --targets boolq-fs              # reuses what was restored

Restoring never overwrites a run folder's record or a library entry that is already there.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composer.atomic import atomic_path, swap_dir  # noqa: E402

RUN_FILES = ("record.json",)


def _target_files(target_dir: Path) -> list[Path]:
    """The JSON files of one target's run folder that the benchmark reads back, relative to it."""
    out = []
    if (target_dir / "graph.json").is_file():
        out.append(Path("graph.json"))
    out += [p.relative_to(target_dir) for p in sorted((target_dir / "compose").glob("*.json"))]
    for run in sorted(p for p in target_dir.iterdir() if p.is_dir() and p.name != "compose"):
        out += [p.relative_to(target_dir) for f in RUN_FILES if (p := run / f).is_file()]
    return out


def _library_names(library: Path, sources: list[str], targets: list[str], slug: str, source_steps: int) -> list[str]:
    from transfer import SHARED_ARMS, shared_save_prefix, source_prompt_name, target_prompt_prefix

    from composer.multitask import SHARED

    names = [source_prompt_name(s, slug, source_steps) for s in sources]
    for shared in SHARED_ARMS:  # the multi-task sources (mixture, mpt), every budget
        names += sorted(p.name for p in library.glob(shared_save_prefix(shared, len(sources), slug, "*") + SHARED)
                        if p.is_dir())
    for t in targets:
        names += sorted(p.name for p in library.glob(f"{target_prompt_prefix(t, slug)}*") if p.is_dir())
    return [n for n in names if (library / n).is_dir()]


def _copy_file(src: Path, dst: Path, overwrite: bool) -> bool:
    if dst.exists() and not overwrite:
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return True


def _copy_entry(src: Path, dst: Path, overwrite: bool) -> bool:
    """One library entry, swapped in whole (a reader never sees half an entry)."""
    if dst.exists() and not overwrite:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.incoming")  # hidden: Library.names() skips dot-folders
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    swap_dir(tmp, dst)
    return True


def save(runs: Path, library: Path, records: Path, targets: list[str], sources: list[str], slug: str,
         source_steps: int) -> dict:
    """runs/ + library -> records (overwrites: runs/ is the newer side)."""
    n_files = 0
    for t in targets:
        tdir = runs / t
        if not tdir.is_dir():
            raise SystemExit(f"error: {tdir} does not exist: run the target first (or check --runs)")
        for rel in _target_files(tdir):
            n_files += _copy_file(tdir / rel, records / t / rel, overwrite=True)
    names = _library_names(library, sources, targets, slug, source_steps)
    for n in names:
        _copy_entry(library / n, records / "library" / n, overwrite=True)
    return {"files": n_files, "library": len(names)}


def restore(records: Path, runs: Path, library: Path) -> dict:
    """records -> runs/ + library, keeping whatever is there already."""
    if not records.is_dir():
        raise SystemExit(f"error: {records} does not exist: nothing was saved for this tier")
    n_files = n_lib = 0
    for tdir in sorted(p for p in records.iterdir() if p.is_dir() and p.name != "library"):
        for rel in _target_files(tdir):
            n_files += _copy_file(tdir / rel, runs / tdir.name / rel, overwrite=False)
    for entry in sorted((records / "library").glob("*")):  # none when no prompt was saved
        n_lib += _copy_entry(entry, library / entry.name, overwrite=False)
    return {"files": n_files, "library": n_lib}


def main(argv: list[str] | None = None) -> None:
    from transfer import TIERS, BenchConfig, default_runs

    from composer.demo import model_slug

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("--tier", default="full", choices=sorted(TIERS))
    ap.add_argument("--targets", help="comma-separated targets to save (default: those with a run folder)")
    ap.add_argument("--model", default=BenchConfig.model)
    ap.add_argument("--sources", help="comma-separated source tasks (default: the tier's)")
    ap.add_argument("--source-steps", type=int, help="the sources' steps, part of their names (default: the tier's)")
    ap.add_argument("--runs", help="run folders (default runs/bench-transfer/TIER)")
    ap.add_argument("--library", default=BenchConfig.library)
    ap.add_argument("--records", help="where the records go (default bench/records/TIER)")
    args = ap.parse_args(argv)
    tier = TIERS[args.tier]
    runs = Path(args.runs or default_runs(args.tier))
    records = Path(args.records or ROOT / "bench" / "records" / args.tier)
    library = Path(args.library)
    if args.action == "restore":
        n = restore(records, runs, library)
        print(f"restored {n['files']} record files into {runs} and {n['library']} prompts into {library} "
              f"(kept what was there)")
        return
    targets = args.targets.split(",") if args.targets else [t for t in tier["targets"] if (runs / t).is_dir()]
    if not targets:
        raise SystemExit(f"error: no target has a run folder under {runs}")
    sources = args.sources.split(",") if args.sources else list(tier["sources"])
    n = save(runs, library, records, targets, sources, model_slug(args.model), args.source_steps or tier["source_steps"])
    print(f"saved {n['files']} record files of {', '.join(targets)} and {n['library']} prompts into {records}")


if __name__ == "__main__":
    main()
