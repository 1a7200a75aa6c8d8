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
    # a second run reuses the subtask prompts from the library
    r2 = CliRunner().invoke(cli, ["demo", "--model", str(tiny_bert_dir), "--out", str(out), "--source-steps", "2",
                                  "--target-steps", "2", "--k-shot", "4", "--target", "negated-polarity", "--quiet",
                                  "--json"], catch_exceptions=False)
    assert all(s["reused"] for s in json.loads(r2.stdout)["sources"].values())
