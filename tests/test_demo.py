"""The demo pipeline end to end on a tiny BERT (the real run uses minilm: `make demo`)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import cli


def test_demo_pipeline_writes_report(tiny_bert_dir, tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--model", str(tiny_bert_dir), "--out", str(out), "--source-steps", "2",
                                 "--target-steps", "2", "--k-shot", "4", "--target", "negated-polarity", "--quiet",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    arms = report["targets"]["negated-polarity"]
    assert set(arms) == {"random", "best", "average", "linear", "attention", "concat"}
    for a in arms.values():
        assert 0 <= a["initial"] <= 1 and 0 <= a["dev"] <= 1 and a["dev"] >= a["initial"]  # best checkpoint kept
    md = (out / "report.md").read_text()
    assert "| negated-polarity | concat |" in md and "![graph](graph.png)" in md
    for png in ("graph.png", "negated-polarity-curves.png", "negated-polarity-attention.png"):
        assert (out / png).stat().st_size > 1000
    assert set(report["sources"]) == {"polarity", "negation", "topic"}
    # the claim it checks, computed from the arms it reports, and printed under the table
    c = report["claim"]
    composed = [a for k, a in arms.items() if k != "random"]
    assert c["split"] == "test" and c["holds"] == all(a["test"] > arms["random"]["test"] for a in composed)
    assert len(c["short"]) == sum(not a["test"] > arms["random"]["test"] for a in composed)
    line = "every composed init beats random on every target (test accuracy): " + ("yes" if c["holds"] else "no (")
    assert line in md
    assert report["machine"]["cpu_isa"] and report["machine"]["cpu_isa"] in md
    # a second run reuses the subtask prompts from the library
    r2 = CliRunner().invoke(cli, ["demo", "--model", str(tiny_bert_dir), "--out", str(out), "--source-steps", "2",
                                  "--target-steps", "2", "--k-shot", "4", "--target", "negated-polarity", "--quiet",
                                  "--json"], catch_exceptions=False)
    assert all(s["reused"] for s in json.loads(r2.stdout)["sources"].values())
    # --kind prefix: the same pipeline on prefixes, under names of their own (the prompts above are kept)
    from composer.library import Library
    from composer.prefix import is_prefix

    lib = Library()
    kept = {n: lib.content_sha(n) for n in lib.names()}
    r3 = CliRunner().invoke(cli, ["demo", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "demo-prefix"),
                                  "--kind", "prefix", "--lr", "0.01", "--source-steps", "2", "--target-steps", "2",
                                  "--k-shot", "4", "--target", "negated-polarity", "--quiet", "--json"],
                            catch_exceptions=False)
    assert r3.exit_code == 0, r3.output
    rep = json.loads(r3.stdout)
    assert not any(s["reused"] for s in rep["sources"].values())  # the input-level prompts are not prefixes
    assert set(rep["targets"]["negated-polarity"]) == set(arms) and rep["config"]["lr"] == 0.01
    new = sorted(set(lib.names()) - set(kept))
    assert new and all(n.endswith("-prefix") and is_prefix(lib.load(n).prompt) for n in new), new
    assert {n: lib.content_sha(n) for n in kept} == kept
    assert "**prefixes**" in (tmp_path / "demo-prefix" / "report.md").read_text()


def test_claim_names_the_arms_that_fall_short():
    from composer.demo import claim, claim_line

    arm = lambda test: {"initial": 0.5, "dev": 0.6, "test": test, "steps_to_random_final": 10}  # noqa: E731
    report = {"targets": {"a": {"random": arm(0.6), "best": arm(0.7), "linear": arm(0.6)},
                          "b": {"random": arm(0.8), "best": arm(0.9), "linear": arm(0.85)}}}
    c = claim(report)
    assert not c["holds"] and c["short"] == ["a linear 0.600 <= random 0.600"]
    assert claim_line(c) == ("every composed init beats random on both targets (test accuracy): "
                             "no (a linear 0.600 <= random 0.600)")
    report["targets"]["a"]["linear"] = arm(0.61)
    assert claim_line(claim(report)).endswith("(test accuracy): yes")
