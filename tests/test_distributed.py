"""Training in child processes: two gloo processes equal one, and a kill -9 then --resume equals no kill.

The two-process runs go through `python -m torch.distributed.run` and through `accelerate launch`
(its own launcher, which sets up the process group with accelerate's environment), with
tests/dist_worker.py as the script. The tiny BERT has dropout 0, so one
process with the global batch and two processes with half each compute the same gradients up to the
order of the float sums.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, write_toy_task
from tests.test_multitask import write_toy3

pytestmark = pytest.mark.dist

WORKER = ROOT / "tests" / "dist_worker.py"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer) -> Path:
    """A toy task pair and a tiny BERT without dropout, on disk for the child processes."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("dist")
    write_toy_task(d, n=64)
    write_toy3(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(d / "bert")
    tokenizer.save_pretrained(d / "bert")
    return d


@pytest.fixture
def env(root, monkeypatch) -> dict:
    monkeypatch.setenv("PROMPT_COMPOSER_DATA", str(root / "data"))
    monkeypatch.setenv("PROMPT_COMPOSER_LIBRARY", str(root / "library"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children: the same float sums in process and out
    yield dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    torch.set_num_threads(threads)


def single(root: Path, name: str, **kw) -> dict:
    base = {"task": str(root / "tasks" / "toy.yaml"), "backbone": str(root / "bert"), "prompt_length": 4,
            "steps": 6, "batch_size": 8, "lr": 0.1, "eval_every": 3, "max_eval": 16, "seed": 0,
            "run_dir": str(root / name)}
    return {**base, **kw}


def multi(root: Path, name: str, **kw) -> dict:
    base = {"tasks": [str(root / "tasks" / "toy.yaml"), str(root / "tasks" / "toy3.yaml")],
            "backbone": str(root / "bert"), "prompt_length": 4, "steps": 6, "batch_size": 8, "lr": 0.1,
            "eval_every": 3, "max_eval": 12, "seed": 0, "run_dir": str(root / name)}
    return {**base, **kw}


# joint mode on the biases: the pooler's bias gets no gradient (no head reads the pooler), and a process
# whose half of a batch lacks a task leaves that task's prompt without one: DDP must allow both
MT = {"save_prefix": "mt-", "mode": "joint", "unfreeze": "bias", "model_lr": 1e-2}


def trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))


def cpu_only(env: dict) -> dict:
    """Two ranks on gloo and the CPU, also where a GPU is present (one GPU cannot hold cuda:0 and cuda:1)."""
    return dict(env, CUDA_VISIBLE_DEVICES="")


def launch(args: list[str], conf, env: dict, root: Path, timeout: int = 240) -> None:
    path = root / f"conf-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(conf))
    p = subprocess.run([sys.executable, *args, str(WORKER), str(path)], env=env, cwd=root, check=False,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_two_processes_reach_the_parameters_of_one(root, env):
    from composer.multitask import MultiTaskConfig, train_multitask
    from composer.train import TrainConfig, train

    log = root / "writes"
    log.mkdir()
    launch(["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"],
           [dict(single(root, "two"), _write_log=str(log)),
            dict(multi(root, "two-mt", **MT), _multitask=True, _write_log=str(log))], cpu_only(env), root)
    for run in ("two", "two-mt"):  # each process took half of the global batch of 8
        seen = [json.loads((log / f"seen-{run}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [(s["rank"], s["world"], s["share"]) for s in seen] == [(0, 2, 4), (1, 2, 4)]
    assert not (log / "rank1.txt").exists()  # only the main process wrote into the runs
    writes = (log / "rank0.txt").read_text()
    assert f"dir {root / 'two' / 'checkpoint'}" in writes
    assert f"dir {root / 'two-mt' / 'best' / 'toy3'}" in writes
    assert not list(root.glob("two*/.*tmp")) and not list(root.glob("two*/.*old"))

    train(TrainConfig(**single(root, "one")), progress=False)
    a, b = trainable(root / "one"), trainable(root / "two")
    assert set(a) == set(b) == {"prompt_source.weight"}
    torch.testing.assert_close(b["prompt_source.weight"], a["prompt_source.weight"], rtol=1e-4, atol=1e-5)

    from composer.runstate import MixturePlan, shard

    plan = MixturePlan([64, 48], 8, seed=0, temperature=1.0)
    assert any(len({t for t, _ in shard(plan.indices(s), r, 2)}) == 1 for s in range(6) for r in (0, 1))
    train_multitask(MultiTaskConfig(**multi(root, "one-mt", **MT)), progress=False)
    a, b = trainable(root / "one-mt"), trainable(root / "two-mt")
    assert set(a) == set(b) and {"prompts.toy3.weight", "network.pooler.dense.bias"} <= set(a)
    for k in a:
        if k.endswith("attention.self.key.bias"):
            # its true gradient is 0 (softmax ignores a shift shared by all keys), so Adam scales float noise
            # whose sign depends on the order of the sums; it moves by noise only, in either run
            assert (b[k] - a[k]).abs().max() < 1e-4
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    from composer.library import Library

    assert Library(root / "library").exists("mt-toy") and Library(root / "library").exists("mt-toy3")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_reaches_the_parameters_of_one(root, env):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU equals one process.

    That is accelerate's own launcher (torch's elastic agent with accelerate's environment); the loop's
    Accelerator finds no CUDA and takes gloo. (`--cpu` with several processes wants mpirun and a hostfile.)
    """
    from composer.train import TrainConfig, train

    log = root / "acc-writes"
    log.mkdir()
    launch(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
           [dict(single(root, "acc-two"), _write_log=str(log))], cpu_only(env), root)
    seen = [json.loads((log / f"seen-acc-two-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world"], s["share"]) for s in seen] == [(0, 2, 4), (1, 2, 4)]
    assert not (log / "rank1.txt").exists()
    train(TrainConfig(**single(root, "acc-one")), progress=False)
    a, b = trainable(root / "acc-one"), trainable(root / "acc-two")
    torch.testing.assert_close(b["prompt_source.weight"], a["prompt_source.weight"], rtol=1e-4, atol=1e-5)


def test_kill_9_then_resume_reaches_the_uninterrupted_parameters(root, env):
    from composer.train import TrainConfig, train

    steps = 16
    conf = dict(single(root, "killed", steps=steps, eval_every=8, checkpoint_every=2), _step_sleep=0.2)
    path = root / "killed.json"
    path.write_text(json.dumps(conf))
    with open(root / "killed.log", "w") as out:
        p = subprocess.Popen([sys.executable, str(WORKER), str(path)], env=env, cwd=root, stdout=out,
                             stderr=subprocess.STDOUT)
        state_file, step, deadline = root / "killed" / "checkpoint" / "state.json", 0, time.monotonic() + 120
        try:
            while step < 4:  # a few checkpoints in: kill it between two of them, or during one
                assert p.poll() is None, (root / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                try:
                    step = json.loads(state_file.read_text())["step"]
                except (FileNotFoundError, json.JSONDecodeError, KeyError):
                    pass
                time.sleep(0.02)
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.kill()
            p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    cut = json.loads(state_file.read_text())["step"]
    assert 4 <= cut < steps

    again = single(root, "ignored", steps=steps, eval_every=8, checkpoint_every=2, run_dir=None)
    r = train(TrainConfig(**again), resume=root / "killed", progress=False)
    assert r["steps"] == steps
    train(TrainConfig(**single(root, "whole", steps=steps, eval_every=8, checkpoint_every=2)), progress=False)
    torch.testing.assert_close(trainable(root / "killed")["prompt_source.weight"],
                               trainable(root / "whole")["prompt_source.weight"], rtol=0, atol=1e-6)


def test_a_refused_run_folder_stops_every_rank(root, env):
    """The main process refuses a folder that is not a run folder; rank 1 is told so and stops too (no rank
    waits for a run that will never start), and the user's file is untouched."""
    folder = root / "not-a-run"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    path = root / "refused.json"
    path.write_text(json.dumps(single(root, "not-a-run")))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc_per_node", "2", "--log-dir", str(root / "refused-logs"), "--redirects", "3",
                        str(WORKER), str(path)], env=cpu_only(env), cwd=root, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode != 0
    logs = {q.parent.name: q.read_text() for q in (root / "refused-logs").rglob("stderr.log")}
    assert sorted(logs) == ["0", "1"], logs  # torchrun's per-rank stderr
    for rank, text in logs.items():
        assert "TrainingError: run folder" in text and "holds files and is not a run folder" in text, (rank, text)
    assert sorted(q.name for q in folder.iterdir()) == ["mine.txt"] and (folder / "mine.txt").read_text() == "keep"
