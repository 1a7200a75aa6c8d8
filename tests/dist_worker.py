"""A training run in a child process, for tests/test_distributed.py.

    python tests/dist_worker.py RUN.json                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py RUN.json

RUN.json holds one run or a list of runs (done in turn, in one launch): TrainConfig fields, or
MultiTaskConfig fields with "_multitask": true, plus test knobs:
  _step_sleep  seconds to sleep before each step (so a kill -9 lands mid-run)
  _write_log   a folder: every file or folder this process writes into the run goes into
               FOLDER/rank{RANK}.txt, one line each (to check that only the main process writes), and
               FOLDER/seen-RUN-rank{RANK}.json says how many processes the loop saw and its share of a batch
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # two processes on a small CPU: one thread each


def run(conf: dict) -> None:
    import composer.loop as L
    import composer.multitask as M
    import composer.runstate as R
    import composer.train as T

    conf = dict(conf)
    sleep = float(conf.pop("_step_sleep", 0) or 0)
    write_log = conf.pop("_write_log", None)
    multitask = conf.pop("_multitask", False)
    rank = int(os.environ.get("RANK", "0"))
    real_shard = T.shard
    saved = (R._atomic_dir, L.atomic_write_text, M.shard, T.shard)
    seen = {}

    def record(what, fn):
        def wrapped(path, *a, **k):
            with open(Path(write_log) / f"rank{rank}.txt", "a") as f:
                f.write(f"{what} {path}\n")
            return fn(path, *a, **k)

        return wrapped

    def watch_shard(idx, r, world):
        part = real_shard(idx, r, world)
        seen.update(world=world, rank=r, share=len(part))
        if sleep:
            time.sleep(sleep)
        return part

    T.shard = watch_shard
    M.shard = watch_shard
    if write_log:
        R._atomic_dir = record("dir", saved[0])  # every folder write, train.py's and multitask.py's, goes through it
        L.atomic_write_text = record("file", saved[1])  # and every file write (the shared run folder's)
    try:
        if multitask:
            M.train_multitask(M.MultiTaskConfig(**conf), progress=False)
        else:
            T.train(T.TrainConfig(**conf), progress=False)
    finally:
        R._atomic_dir, L.atomic_write_text, M.shard, T.shard = saved
    if write_log:
        name = Path(conf.get("run_dir") or "run").name
        (Path(write_log) / f"seen-{name}-rank{rank}.json").write_text(json.dumps(seen))


def main() -> None:
    conf = json.loads(Path(sys.argv[1]).read_text())
    for one in conf if isinstance(conf, list) else [conf]:
        run(one)


if __name__ == "__main__":
    main()
