"""composer.atomic: a write lands whole or not at all, and leaves no temp file behind."""

import os

import pytest

from composer.atomic import atomic_path, atomic_write_text, swap_dir


def test_write_replaces_whole_file_with_usual_mode(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert os.listdir(path.parent) == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_error_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "a.png"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path, suffix=".png") as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".png"
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.png"]


def test_writer_that_never_creates_the_temp_file_fails_and_keeps_old(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(FileNotFoundError), atomic_path(path):
        pass
    assert path.read_text() == "old"


def test_swap_dir_replaces_folder(tmp_path):
    final, tmp = tmp_path / "run", tmp_path / ".run.tmp"
    final.mkdir()
    (final / "old.txt").write_text("1")
    tmp.mkdir()
    (tmp / "new.txt").write_text("2")
    swap_dir(tmp, final)
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["run"]
