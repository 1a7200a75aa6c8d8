"""bench/transfer.py keeps each finished run's record and reads it back only when nothing it depends on changed."""
import dataclasses
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str, filename: str):
    """Load a script of bench/ as a module, registered under ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_mod():
    return _bench_module("bench_transfer", "transfer.py")


@pytest.fixture(scope="module")
def records():
    """bench/records.py, which keeps a tier's finished runs in git."""
    return _bench_module("bench_records", "records.py")


@pytest.fixture(autouse=True)
def _in_task_dir(toy_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the toy task by name: ./tasks/toy.yaml


def smoke_argv(tiny_bert_dir, tmp_path, out, *flags) -> list[str]:
    """bench/transfer.py's command line for the toy target on a tiny BERT, small evaluations, all output under
    ``out``; ``flags`` add the sources, arms and budgets of one test."""
    return ["--smoke", "--model", str(tiny_bert_dir), "--targets", "toy", "--eval-every", "2", "--max-eval", "16",
            "--max-test", "16", "--prompt-length", "4", "--batch-size", "8", "--library", str(tmp_path / "lib"),
            "--runs", str(out / "runs"), "--figures", str(out / "fig"), "--data-dir", str(tmp_path / "data"),
            "--out-md", str(out / "r.md"), *flags]


def make(bench_mod, tiny_bert_dir, tmp_path, **kw):
    cfg = bench_mod.BenchConfig(tier="smoke", model=str(tiny_bert_dir), library=str(tmp_path / "lib"),
                                runs=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"), steps=4, eval_every=2,
                                max_eval=16, max_test=16, batch_size=8, prompt_length=4, lr=0.1)
    return bench_mod.Bench(dataclasses.replace(cfg, **kw))


def test_finished_run_is_read_back(bench_mod, toy_task, tiny_bert_dir, tmp_path):
    a = make(bench_mod, tiny_bert_dir, tmp_path)
    first = a.tune("toy", "random", 0, 4, "random-s0")
    record = tmp_path / "runs" / "toy" / "random-s0" / "record.json"
    assert record.exists() and first["key"]["init"] == "random"
    stamp = record.stat().st_mtime_ns

    b = make(bench_mod, tiny_bert_dir, tmp_path)  # a later invocation: a new process, same settings
    again = b.tune("toy", "random", 0, 4, "random-s0")
    assert b.reused == 1 and again == json.loads(record.read_text())
    assert (again["dev"], again["test"], again["curve"]) == (first["dev"], first["test"], [list(x) for x in first["curve"]])
    assert record.stat().st_mtime_ns == stamp  # not run again

    c = make(bench_mod, tiny_bert_dir, tmp_path, lr=0.05)  # another setting: runs again
    c.tune("toy", "random", 0, 4, "random-s0")
    assert c.reused == 0 and json.loads(record.read_text())["key"]["lr"] == 0.05

    d = make(bench_mod, tiny_bert_dir, tmp_path, lr=0.05, rerun=True)
    d.tune("toy", "random", 0, 4, "random-s0")
    assert d.reused == 0


def test_records_name_the_cpu_and_its_instruction_set_outside_the_key(bench_mod, toy_task, tiny_bert_dir,
                                                                        tmp_path):
    a = make(bench_mod, tiny_bert_dir, tmp_path)
    a.tune("toy", "random", 0, 4, "random-s0")
    record = tmp_path / "runs" / "toy" / "random-s0" / "record.json"
    rec = json.loads(record.read_text())
    assert rec["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and rec["cpu_isa"]
    assert rec["cpu"] == a.cpu and not {"cpu", "cpu_isa"} & set(rec["key"])

    del rec["cpu_isa"]  # a record written before the field was: still the same run
    record.write_text(json.dumps(rec))
    b = make(bench_mod, tiny_bert_dir, tmp_path)
    assert "cpu_isa" not in b.tune("toy", "random", 0, 4, "random-s0") and b.reused == 1


def test_time_budget_starts_no_new_run_but_reads_finished_ones_back(bench_mod, toy_task, tiny_bert_dir, tmp_path):
    make(bench_mod, tiny_bert_dir, tmp_path).tune("toy", "random", 0, 4, "random-s0")
    spent = make(bench_mod, tiny_bert_dir, tmp_path, time_budget=0)
    time.sleep(0.01)
    assert spent.tune("toy", "random", 0, 4, "random-s0")["seed"] == 0 and spent.reused == 1  # finished: read back
    with pytest.raises(bench_mod.OutOfTime, match="toy vocab-s0"):
        spent.tune("toy", "vocab", 0, 4, "vocab-s0")
    with pytest.raises(bench_mod.OutOfTime):
        spent.peft("toy", 0, 4, "peft-s0")
    assert not (tmp_path / "runs" / "toy" / "vocab-s0").exists() and not (tmp_path / "runs" / "toy" / "peft-s0").exists()
    ample = make(bench_mod, tiny_bert_dir, tmp_path, time_budget=60)
    assert ample.tune("toy", "vocab", 0, 4, "vocab-s0")["init"] == "vocab"


def test_spent_time_budget_exits_3_and_says_how_to_go_on(bench_mod, toy_task, tiny_bert_dir, tmp_path, capsys):
    from tests.conftest import write_toy_task

    write_toy_task(tmp_path, "toy-a")
    argv = ["--smoke", "--model", str(tiny_bert_dir), "--sources", "toy-a", "--targets", "toy", "--time-budget", "0",
            "--library", str(tmp_path / "lib"), "--runs", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as e:
        bench_mod.main(argv)
    assert e.value.code == 3
    assert "run the same command to go on" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists() or not any((tmp_path / "lib").iterdir())  # no source was trained


def test_records_say_what_is_missing_in_one_line(records, tmp_path):
    where = ["--runs", str(tmp_path / "runs"), "--library", str(tmp_path / "lib"), "--records", str(tmp_path / "rec")]
    with pytest.raises(SystemExit, match="nothing was saved for this tier"):
        records.main(["restore", *where])
    with pytest.raises(SystemExit, match="run the target first"):
        records.main(["save", "--targets", "rte-fs", *where])
    with pytest.raises(SystemExit, match="no target has a run folder"):
        records.main(["save", *where])


def test_changed_init_prompt_runs_again(bench_mod, toy_task, tiny_bert_dir, tmp_path):
    a = make(bench_mod, tiny_bert_dir, tmp_path)
    H = a.bb.model.config.hidden_size
    a.lib.save("src", torch.randn(4, H, generator=torch.Generator().manual_seed(0)), {"backbone": str(tiny_bert_dir)})
    a.tune("toy", "library:src", 0, 4, "from-src-s0")
    b = make(bench_mod, tiny_bert_dir, tmp_path)
    b.tune("toy", "library:src", 0, 4, "from-src-s0")
    assert b.reused == 1

    b.lib.save("src", torch.randn(4, H, generator=torch.Generator().manual_seed(1)), {"backbone": str(tiny_bert_dir)})
    c = make(bench_mod, tiny_bert_dir, tmp_path)  # same name, other tensors (a retrained source)
    c.tune("toy", "library:src", 0, 4, "from-src-s0")
    assert c.reused == 0


def test_saved_prompt_missing_from_library_runs_again(bench_mod, toy_task, tiny_bert_dir, tmp_path):
    a = make(bench_mod, tiny_bert_dir, tmp_path)
    a.tune("toy", "random", 0, 4, "random-s0", save="toy-random")
    assert a.lib.exists("toy-random")
    a.lib.remove("toy-random")
    b = make(bench_mod, tiny_bert_dir, tmp_path)
    b.tune("toy", "random", 0, 4, "random-s0", save="toy-random")
    assert b.reused == 0 and b.lib.exists("toy-random")


def test_every_setting_is_in_the_run_key_or_accounted_for(bench_mod, tiny_bert_dir, tmp_path):
    b = make(bench_mod, tiny_bert_dir, tmp_path)
    fields = {f.name for f in dataclasses.fields(bench_mod.BenchConfig)}
    keyed = set(b.run_key())
    elsewhere = set(bench_mod.RUN_KEY_ELSEWHERE)
    assert not keyed & elsewhere, f"both in the key and said to be elsewhere: {keyed & elsewhere}"
    assert fields - keyed - elsewhere == set(), "BenchConfig fields neither in run_key nor in RUN_KEY_ELSEWHERE"
    assert elsewhere <= fields, f"RUN_KEY_ELSEWHERE names fields BenchConfig no longer has: {elsewhere - fields}"


def test_whole_pipeline_writes_its_report_and_reads_it_back(bench_mod, records, toy_task, tiny_bert_dir, tmp_path,
                                                            capsys):
    """main() end to end on a tiny BERT: sources, every arm, transferability, figures, markdown; then again from
    the records alone."""
    from tests.conftest import write_toy_task

    for name in ("toy-a", "toy-b"):  # two source tasks (the toy data under other names)
        write_toy_task(tmp_path, name)
    out = tmp_path / "out"
    argv = ["--smoke", "--model", str(tiny_bert_dir), "--sources", "toy-a,toy-b", "--targets", "toy",
            "--arms", "random,vocab,peft,best,average,linear,linear-gf,attention,full,joint", "--source-steps", "4",
            "--steps", "4", "--eval-every", "2", "--max-eval", "16", "--max-test", "16", "--prompt-length", "4",
            "--batch-size", "8", "--library", str(tmp_path / "lib"), "--runs", str(out / "runs"),
            "--figures", str(out / "fig"), "--data-dir", str(tmp_path / "data"), "--out-md", str(out / "r.md")]
    bench_mod.main(argv)
    capsys.readouterr()
    res = json.loads((out / "runs" / "results.json").read_text())
    t = res["targets"]["toy"]
    arms = {"random", "vocab", "peft", "best", "average", "linear", "linear-gf", "attention", "full", "joint"}
    assert set(t["runs"]) == arms and all(len(v) == 1 for v in t["runs"].values())
    assert t["skipped"] == {}  # concat is not asked for; nothing else may be skipped
    assert set(t["pairs"]) == {"toy-a", "toy-b"}
    for gain in ("gain_dev", "gain_dev_last", "gain_test"):
        assert set(res["transferability"][gain]) == {"cos-avg", "cos-tok", "on", "transfer"}
        assert all(v["n"] == 2 for v in res["transferability"][gain].values())
    assert all(0 <= r["test"] <= 1 for v in t["runs"].values() for r in v)
    md = (out / "r.md").read_text()
    for arm in arms:
        assert f"| {arm} |" in md
    assert (out / "fig" / "transfer-smoke-toy.png").stat().st_size > 0
    assert (out / "fig" / "transfer-smoke-gain.png").stat().st_size > 0
    assert res["reused_runs"] == 0

    # the records go to git (bench/records.py save) and come back on a fresh machine (restore): run again
    # from them alone, and every run and composition is read back, none is trained again
    rec_dir = tmp_path / "records"
    where = ["--tier", "smoke", "--model", str(tiny_bert_dir), "--sources", "toy-a,toy-b", "--source-steps", "4",
             "--runs", str(out / "runs"), "--library", str(tmp_path / "lib"), "--records", str(rec_dir)]
    records.main(["save", "--targets", "toy", *where])
    saved = sorted(p.relative_to(rec_dir).as_posix() for p in rec_dir.rglob("*") if p.is_file())
    assert not any(p.endswith((".jsonl", ".pt")) or "/checkpoint/" in p for p in saved)  # measurements only
    n_records = sum(p.endswith("record.json") or "/compose/" in p for p in saved)
    assert n_records > 10
    shutil.rmtree(out / "runs")
    shutil.rmtree(tmp_path / "lib")
    records.main(["restore", *where])
    bench_mod.main([*argv, "--time-budget", "0"])  # a spent budget stops only runs that would train
    again = json.loads((out / "runs" / "results.json").read_text())
    assert again["reused_runs"] == n_records and again["summary"] == res["summary"]
    assert again["targets"]["toy"]["runs"] == t["runs"]
    assert sorted(s["reused"] for s in again["sources"].values()) == [True, True]
    # each record names the CPU that made it and the kernels' instruction set (float kernels differ between
    # CPUs), and the report says it
    cpu = f"{res['machine']['cpu']} ({res['machine']['cpu_isa']})"
    assert res["machine"]["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert again["run_cpus"] == [cpu]
    md = (out / "r.md").read_text()
    assert f"made on {cpu} (the same code" in md and f"Machine: {cpu}, " in md


def _rec(seed, test, dev=0.5):
    return {"seed": seed, "initial": 0.3, "dev": dev, "test": test, "s_per_step": 0.1,
            "curve": [[0, 10], [0.3, dev]]}


def test_gap_closed_only_where_full_tuning_beats_random_by_more_than_the_noise(bench_mod):
    from transfer_report import summarise_target

    def summary(random, full, arm):
        runs = {name: [_rec(i, x) for i, x in enumerate(xs)]
                for name, xs in (("random", random), ("full", full), ("best", arm))}
        return summarise_target({"runs": runs})

    clear = summary([0.70, 0.72, 0.74], [0.90, 0.91, 0.92], [0.805, 0.815, 0.825])
    assert clear["best"]["gap_test"] == pytest.approx(0.5)  # (0.815 - 0.72) / (0.91 - 0.72)
    assert clear["full"]["gap_test"] == pytest.approx(1.0) and clear["random"]["gap_test"] == 0.0
    # full ahead by 0.006 with random's seeds 0.06 apart: a gap inside the noise gets no number
    noisy = summary([0.625, 0.679, 0.554], [0.625, 0.607, 0.643], [0.446, 0.393, 0.482])
    assert noisy["best"]["gap_test"] is None and noisy["full"]["gap_test"] is None
    behind = summary([0.70, 0.72, 0.74], [0.60, 0.61, 0.62], [0.80, 0.81, 0.82])
    assert behind["best"]["gap_test"] is None

    # the mean gap (summary table and claims alike) skips the targets that have none
    from transfer_report import claims, mean_gap
    both = {"clear": clear, "noisy": noisy}
    assert mean_gap(both, "best") == (pytest.approx(0.5), 1)
    assert mean_gap({"noisy": noisy}, "best") == (None, 0)
    assert "mean gap closed (test) 0.50 over 1 targets" in "\n".join(claims(both))


def test_runs_timed_on_crowded_cores_are_named(bench_mod):
    from transfer_report import crowded

    runs = {"random": [{"seed": 0, "load": [1.9, 2.4]}, {"seed": 1, "load": [2.1, 4.6]}],
            "peft": [{"seed": 0}],  # a record from before the load was kept
            "full": [{"seed": 2, "load": [3.5, 1.0]}]}
    assert crowded(runs, threads=2) == ["random seed 1 (load 2.1/4.6)", "full seed 2 (load 3.5/1)"]
    assert crowded(runs, threads=3) == ["random seed 1 (load 2.1/4.6)"]
    assert crowded(runs, threads=4) == []


def test_prefix_kind_runs_every_arm_on_prefixes_under_their_own_names(bench_mod, toy_task, tiny_bert_dir, tmp_path,
                                                                     capsys):
    """--kind prefix: sources and every prompt arm tune [L, 2, P, D] prefixes (PEFT's PrefixTuning as the peer),
    named apart from the input-level prompts; full stays model tuning with one virtual token."""
    from composer.library import Library
    from composer.prefix import is_prefix
    from tests.conftest import write_toy_task

    for name in ("toy-a", "toy-b"):
        write_toy_task(tmp_path, name)
    out = tmp_path / "out"
    argv = smoke_argv(tiny_bert_dir, tmp_path, out, "--kind", "prefix", "--sources", "toy-a,toy-b", "--arms",
                      "random,peft,best,average,attention,full,joint", "--source-steps", "4", "--steps", "4",
                      "--lr", "0.01")
    bench_mod.main(argv)
    capsys.readouterr()
    res = json.loads((out / "runs" / "results.json").read_text())
    t = res["targets"]["toy"]
    assert set(t["runs"]) == {"random", "peft", "best", "average", "attention", "full", "joint"}
    assert t["skipped"] == {}
    lib = Library(tmp_path / "lib")
    for s, v in res["sources"].items():
        assert "-prefix-" in v["prompt"] and is_prefix(lib.load(v["prompt"]).prompt), s
    for arm in ("average", "attention"):
        assert t["runs"][arm][0]["init"].startswith("library:") and "-prefix-" in t["runs"][arm][0]["init"]
    assert t["runs"]["peft"][0]["init"] == "random (PEFT PrefixTuning)"
    assert is_prefix(lib.load(t["target_prompt"]).prompt)
    # the arms' records say what they tuned; full tunes the model with an input-level token
    keys = {arm: json.loads((Path(v[0]["run_dir"]) / "record.json").read_text())["key"] for arm, v in t["runs"].items()}
    assert keys["full"]["kind"] == "prompt" and all(k["kind"] == "prefix" for a, k in keys.items() if a != "full")
    assert "**prefixes**" in (out / "r.md").read_text()
    # the PEFT peer computes the same function as ours at the same (random) init: equal dev scores at step 0
    assert t["runs"]["peft"][0]["initial"] == pytest.approx(t["runs"]["random"][0]["initial"], abs=1e-6)


def test_mixture_arm_tunes_from_one_prompt_trained_on_every_source(bench_mod, records, toy_task, tiny_bert_dir,
                                                                  tmp_path, capsys):
    """--arms mixture: one prompt trained on all the sources at once (saved with the tasks it saw and each task's
    dev score), every seed tunes the target from it; a second run reuses it; another source list refuses it."""
    from composer.library import Library
    from tests.conftest import write_toy_task

    for name in ("toy-a", "toy-b", "toy-c"):
        write_toy_task(tmp_path, name)
    out = tmp_path / "out"

    def argv(sources="toy-a,toy-b"):
        return smoke_argv(tiny_bert_dir, tmp_path, out, "--kind", "prefix", "--sources", sources, "--arms",
                          "random,mixture", "--source-steps", "2", "--mixture-steps", "4", "--mixture-batch-size", "8",
                          "--steps", "2", "--lr", "0.01")

    bench_mod.main(argv())
    capsys.readouterr()
    res = json.loads((out / "runs" / "results.json").read_text())
    mix = res["mixture"]
    assert mix["reused"] is False and set(mix["dev"]) == {"toy-a", "toy-b"} and mix["best_step"] in (0, 1, 2, 3, 4)
    meta = Library(tmp_path / "lib").meta(mix["prompt"])
    assert meta["provenance"]["tasks"] == ["toy-a", "toy-b"] and meta["kind"] == "prefix"
    recs = res["targets"]["toy"]["runs"]["mixture"]
    assert [r["init"] for r in recs] == [f"library:{mix['prompt']}"]
    assert mix["prompt"] in (out / "r.md").read_text() and "| mixture |" in (out / "r.md").read_text()
    # the one-class reference beside the arms: each class's share of the subset, for an accuracy task
    const = res["targets"]["toy"]["constant"]
    assert set(const) == {"dev", "test"} and all(set(v) == {"0", "1"} for v in const.values())
    assert all(sum(v.values()) == pytest.approx(1.0) and min(v.values()) > 0 for v in const.values())
    assert "always '1'" in (out / "r.md").read_text()
    assert 0.0 <= recs[0]["test_accuracy"] <= 1.0

    bench_mod.main(argv())  # the mixture and its target run come back from the library and the run folder
    capsys.readouterr()
    res2 = json.loads((out / "runs" / "results.json").read_text())
    assert res2["mixture"]["reused"] is True and res2["mixture"]["dev"] == mix["dev"]
    for s in ("toy-a", "toy-b"):  # a reused source keeps its score before training too (library metrics)
        assert res2["sources"][s]["reused"] and res2["sources"][s]["initial"] == res["sources"][s]["initial"]
    assert res2["targets"]["toy"]["runs"]["mixture"][0]["dev"] == recs[0]["dev"]

    # bench/records.py keeps the mixture with the sources, so a restored run reuses it
    from composer.demo import model_slug

    slug = model_slug(str(tiny_bert_dir)) + "-prefix"
    assert mix["prompt"] == f"mixture2-{slug}-4-shared"
    records.save(out / "runs", tmp_path / "lib", tmp_path / "rec", ["toy"], ["toy-a", "toy-b"], slug, 2)
    assert (tmp_path / "rec" / "library" / mix["prompt"]).is_dir()

    with pytest.raises(SystemExit, match="trained on toy-a,toy-b, not on --sources toy-a,toy-c"):
        bench_mod.main(argv("toy-a,toy-c"))


def test_mpt_arms_adapt_from_a_shared_prompt_distilled_from_the_sources(bench_mod, records, toy_task, tiny_bert_dir,
                                                                       tmp_path, capsys):
    """--arms mpt,peft-mpt: MPT's stage 1 over the sources (each source's prompt its teacher, the entry keeping
    each source's dev score at step 0 and at its last step), then the target from the shared prompt at the mean
    factors, ours and PEFT's; the second invocation reuses the entry and both runs; records keep the entry."""
    from composer.library import Library
    from composer.mpt import is_mpt
    from tests.conftest import write_toy_task

    for name in ("toy-a", "toy-b"):
        write_toy_task(tmp_path, name)
    out = tmp_path / "out"
    argv = smoke_argv(tiny_bert_dir, tmp_path, out, "--sources", "toy-a,toy-b", "--arms", "random,mpt,peft-mpt",
                      "--source-steps", "2", "--mpt-steps", "4", "--mpt-batch-size", "8", "--steps", "2", "--lr", "0.1")
    bench_mod.main(argv)
    capsys.readouterr()
    res = json.loads((out / "runs" / "results.json").read_text())
    mpt = res["mpt"]
    lib = Library(tmp_path / "lib")
    entry = lib.load(mpt["prompt"])
    assert is_mpt(entry) and entry.meta["provenance"]["tasks"] == ["toy-a", "toy-b"]
    assert entry.meta["provenance"]["teachers"] == {s: res["sources"][s]["prompt"] for s in ("toy-a", "toy-b")}
    assert set(mpt["dev"]) == set(mpt["initial"]) == {"toy-a", "toy-b"} and mpt["best_step"] == 4
    assert all(0.0 <= v <= 1.0 for v in mpt["dev"].values())
    runs = res["targets"]["toy"]["runs"]
    assert [r["init"] for r in runs["mpt"]] == [f"library:{mpt['prompt']}@mean"]
    assert [r["init"] for r in runs["peft-mpt"]] == [f"peft-mpt:library:{mpt['prompt']}@mean"]
    # the two start from one prompt: PEFT's AVERAGE_SOURCE_TASKS is our @mean, so their step-0 dev scores agree
    assert runs["peft-mpt"][0]["initial"] == pytest.approx(runs["mpt"][0]["initial"], abs=1e-6)
    assert runs["mpt"][0]["key"]["init_sha"] == lib.content_sha(mpt["prompt"])  # a retrained entry runs again
    md = (out / "r.md").read_text()
    assert mpt["prompt"] in md and "| mpt |" in md and "| peft-mpt |" in md

    bench_mod.main(argv)
    capsys.readouterr()
    res2 = json.loads((out / "runs" / "results.json").read_text())
    assert res2["mpt"]["reused"] is True and res2["mpt"]["dev"] == mpt["dev"] and res2["reused_runs"] >= 3
    assert res2["targets"]["toy"]["runs"]["peft-mpt"][0]["dev"] == runs["peft-mpt"][0]["dev"]

    from composer.demo import model_slug

    records.save(out / "runs", tmp_path / "lib", tmp_path / "rec", ["toy"], ["toy-a", "toy-b"],
                 model_slug(str(tiny_bert_dir)), 2)
    assert (tmp_path / "rec" / "library" / mpt["prompt"]).is_dir()


def test_peft_mpt_arm_refuses_prefixes(bench_mod, capsys):
    with pytest.raises(SystemExit):
        bench_mod.parse(["--smoke", "--kind", "prefix", "--arms", "random,peft-mpt"])
    assert "PEFT's MultitaskPromptTuning is an input-level prompt" in capsys.readouterr().err
