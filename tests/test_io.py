"""brainfm.io: atomic writes leave the complete new content or the old one, and no temporary."""

from __future__ import annotations

import os

import pytest

from brainfm.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, temp_path


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_text_and_bytes_replace_the_target_and_leave_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    assert atomic_write_text(target, "a,b\n") == target  # the parent folder is made
    atomic_write_text(target, "c,d\r\n", newline="")
    assert target.read_bytes() == b"c,d\r\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and _hidden(target.parent) == []


def test_the_temporary_is_a_hidden_sibling_with_the_suffix(tmp_path):
    tmp = temp_path(tmp_path / "row.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(".row.json.tmp-") and not tmp.name.endswith(".json")
    assert f"-{os.getpid()}-" in tmp.name and temp_path(tmp_path / "row.json") != tmp  # unique per call
    assert temp_path(tmp_path / "plot.png", keep_suffix=True).suffix == ".png"  # for savefig


def test_an_error_keeps_the_old_content_and_deletes_the_temporary(tmp_path):
    target = tmp_path / "best.yaml"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("half")
    assert target.read_text() == "old" and _hidden(tmp_path) == []


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "shards"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and _hidden(tmp_path) == []
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "c").write_text("3")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["b"] and _hidden(tmp_path) == []
