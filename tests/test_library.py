"""The prompt library: round trips, atomic and concurrent writes, and every bad input."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from composer.errors import LibraryError
from composer.library import Library, check_compatible, default_root


def meta(**kw):
    return dict({"task": "polarity", "backbone": "minilm", "family": "encoder", "head": "label-similarity"}, **kw)


def test_round_trip(tmp_path):
    lib = Library(tmp_path / "lib")
    p = torch.randn(7, 16)
    path = lib.save("polarity-minilm", p, meta(metrics={"dev": {"score": 0.9}}),
                    extras={"head": {"proj.weight": torch.randn(2, 16)}})
    assert lib.names() == ["polarity-minilm"] and lib.exists("polarity-minilm")
    e = lib.load("polarity-minilm")
    assert torch.equal(e.prompt, p) and e.prompt.dtype == torch.float32
    assert e.meta["length"] == 7 and e.meta["hidden_size"] == 16 and e.meta["metrics"]["dev"]["score"] == 0.9
    assert {"version", "created", "task", "backbone", "family"} <= set(e.meta)
    assert e.extra("head")["proj.weight"].shape == (2, 16) and e.extra("composer") is None
    # the on-disk format is what DESIGN.md says: one key, float32, contiguous; JSON sorted with indent
    raw = load_file(str(path / "prompt.safetensors"))
    assert list(raw) == ["prompt_embeddings"] and raw["prompt_embeddings"].is_contiguous()
    text = (path / "prompt.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)


def test_overwrite_and_remove(tmp_path):
    lib = Library(tmp_path)
    lib.save("a", torch.zeros(2, 3), meta())
    lib.save("a", torch.ones(2, 3), meta())
    assert torch.equal(lib.load("a").prompt, torch.ones(2, 3))
    with pytest.raises(LibraryError, match="already exists"):
        lib.save("a", torch.ones(2, 3), meta(), overwrite=False)
    lib.remove("a")
    assert lib.names() == [] and not any(p.name.endswith(".old") for p in tmp_path.iterdir())


def test_content_sha_follows_the_tensors_not_the_metadata(tmp_path):
    lib = Library(tmp_path)
    p = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    lib.save("a", p, meta(metrics={"dev": {"score": 0.5}}))
    first = lib.content_sha("a")
    lib.save("a", p.clone(), meta(metrics={"dev": {"score": 0.9}}))  # resaved, other metadata
    assert lib.content_sha("a") == first and len(first) == 16
    lib.save("a", p + 1e-3, meta())
    assert lib.content_sha("a") != first
    with pytest.raises(LibraryError, match="no prompt"):
        lib.content_sha("missing")


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPT_COMPOSER_LIBRARY", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x" and Library().root == tmp_path / "x"
    monkeypatch.delenv("PROMPT_COMPOSER_LIBRARY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_root() == tmp_path / "data" / "prompt-composer" / "library"


@pytest.mark.parametrize("name", ["a/b", "../evil", "..", "x..y", "/abs", "", ".hidden", "a b"])
def test_bad_names(tmp_path, name):
    with pytest.raises(LibraryError, match="bad prompt name"):
        Library(tmp_path).save(name, torch.zeros(1, 2), meta())


def test_missing_prompt_names_the_library(tmp_path):
    lib = Library(tmp_path)
    lib.save("there", torch.zeros(1, 2), meta())
    with pytest.raises(LibraryError, match=r"no prompt 'nope' in the library .*it has: there"):
        lib.load("nope")


def test_corrupted_and_truncated(tmp_path):
    lib = Library(tmp_path)
    d = lib.save("p", torch.randn(4, 8), meta())
    f = d / "prompt.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(LibraryError, match="truncated or corrupted.*library rm p"):
        lib.load("p")
    f.write_bytes(b"\x00" * 3)
    with pytest.raises(LibraryError, match="truncated or corrupted"):
        lib.load("p")
    (d / "prompt.json").write_text("{not json")
    with pytest.raises(LibraryError, match="not valid JSON"):
        lib.load("p")


def test_shape_disagreeing_with_json(tmp_path):
    lib = Library(tmp_path)
    d = lib.save("p", torch.randn(4, 8), meta())
    m = json.loads((d / "prompt.json").read_text())
    m["hidden_size"] = 9
    (d / "prompt.json").write_text(json.dumps(m))
    with pytest.raises(LibraryError, match=r"shape \(4, 8\) does not match"):
        lib.load("p")


def test_newer_version_extra_keys_warn(tmp_path, caplog):
    lib = Library(tmp_path)
    d = lib.save("p", torch.randn(2, 4), meta())
    m = json.loads((d / "prompt.json").read_text())
    m.update(version="9.0.0", shiny_new_field={"x": 1})
    (d / "prompt.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING):
        e = lib.load("p")
    assert e.prompt.shape == (2, 4)
    assert "shiny_new_field" in caplog.text and "9.0.0" in caplog.text


def test_hidden_size_mismatch_names_both():
    with pytest.raises(LibraryError, match=r"hidden size 384 .*'minilm'.*'smollm2-135m' has hidden size 576"):
        check_compatible({"hidden_size": 384, "backbone": "minilm", "family": "encoder"}, "p",
                         "smollm2-135m", "decoder", 576)
    with pytest.raises(LibraryError, match="trained on a encoder"):
        check_compatible({"hidden_size": 384, "backbone": "minilm", "family": "encoder"}, "p", "x", "decoder", 384)


def _writer(root, name, value, n):
    lib = Library(root)
    for _ in range(n):
        lib.save(name, torch.full((64, 128), float(value)), meta(writer=value))


def test_concurrent_writers_leave_whole_entries(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, v, 15))
             for name, v in (("shared", 1), ("shared", 2), ("own", 3))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lib = Library(tmp_path)
    assert lib.names() == ["own", "shared"]
    e = lib.load("shared")
    v = e.prompt[0, 0].item()
    assert v in (1.0, 2.0) and torch.all(e.prompt == v)  # one writer's tensor, never a mix
    assert e.meta["writer"] == int(v)  # and the JSON of the same writer
    assert torch.all(lib.load("own").prompt == 3.0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp") or p.name.endswith(".old")]
