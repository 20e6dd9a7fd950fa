"""The one atomic-write helper every writer of the project goes through."""
from __future__ import annotations

import pytest

from wss_ray.atomic import atomic_path, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_what_was_there(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []
    write_text(target, "new")
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_the_temporary_keeps_the_suffix_for_writers_that_choose_a_format_by_it(tmp_path):
    with atomic_path(tmp_path / "stem.wav") as tmp:
        assert tmp.suffix == ".wav" and tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert (tmp_path / "stem.wav").read_bytes() == b"x"


def test_folders_are_replaced_whole_or_kept(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.pt").write_text("1")
        (tmp / "stale").write_text("s")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "model.pt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["model.pt"] and (target / "model.pt").read_text() == "2"
    # replace=False: an existing result is kept (a finished track of an earlier run)
    with atomic_path(target, directory=True, replace=False) as tmp:
        (tmp / "model.pt").write_text("3")
    assert (target / "model.pt").read_text() == "2" and _leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "model.pt").write_text("4")
            raise ValueError("interrupted")
    assert (target / "model.pt").read_text() == "2" and _leftovers(tmp_path) == []


def test_a_folder_is_never_swapped_for_a_file_or_back(tmp_path):
    (tmp_path / "piano.wav").mkdir()
    (tmp_path / "piano.wav" / "keep").write_text("mine")
    with pytest.raises(IsADirectoryError, match="piano.wav: is a folder"):
        write_text(tmp_path / "piano.wav", "x")
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(NotADirectoryError, match="ckpt: is a file"):
        with atomic_path(tmp_path / "ckpt", directory=True):
            pass
    assert (tmp_path / "piano.wav" / "keep").read_text() == "mine" and (tmp_path / "ckpt").read_text() == "a file"
