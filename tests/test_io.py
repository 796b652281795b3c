"""brainfm.io: atomic writes leave the complete new content or the old one, and no temporary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from brainfm.io import (
    PendingDir,
    PendingFile,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temps,
    temp_path,
)


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
    assert temp_path(tmp_path / "map.nii.gz", keep_suffix=True).name.endswith(".nii.gz")  # nibabel: both suffixes


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


def test_a_pending_file_appears_only_at_commit(tmp_path):
    target = tmp_path / "sub" / "features.h5"
    pending = PendingFile(target)  # for a writer that outlives one block (h5py, a ParquetWriter)
    assert pending.tmp.parent == target.parent and pending.tmp.name.startswith(".features.h5.tmp-")
    pending.tmp.write_text("rows")
    assert not target.exists()
    assert pending.commit() == target and target.read_text() == "rows"
    pending.discard()  # after a commit: nothing (a ``finally`` may call it)
    assert target.read_text() == "rows" and _hidden(target.parent) == []
    with pytest.raises(RuntimeError, match="already committed"):
        pending.commit()


def test_a_discarded_pending_file_leaves_the_old_content(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("old")
    pending = PendingFile(target)
    pending.tmp.write_text("half")
    pending.discard()
    assert target.read_text() == "old" and _hidden(tmp_path) == []
    pending.discard()  # twice: nothing
    PendingFile(tmp_path / "never.h5").discard()  # nothing was written: nothing to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_a_failed_commit_keeps_the_temporary_until_discard(tmp_path):
    target = tmp_path / "a_folder"
    target.mkdir()
    (target / "x").write_text("1")
    pending = PendingFile(target)
    pending.tmp.write_text("file")
    with pytest.raises(OSError):
        pending.commit()  # a file cannot replace a folder
    assert pending.tmp.exists() and (target / "x").read_text() == "1"
    pending.discard()
    assert _hidden(tmp_path) == []


def test_a_pending_dir_replaces_the_old_directory_whole(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.npy").write_text("old")
    pending = PendingDir(target)
    assert pending.tmp.is_dir() and list(pending.tmp.iterdir()) == []
    (pending.tmp / "new.npy").write_text("new")
    assert [p.name for p in target.iterdir()] == ["old.npy"]  # untouched until the commit
    pending.commit()
    assert [p.name for p in target.iterdir()] == ["new.npy"] and _hidden(tmp_path) == []
    failed = PendingDir(target)
    (failed.tmp / "half.npy").write_text("half")
    failed.discard()
    assert [p.name for p in target.iterdir()] == ["new.npy"] and _hidden(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_stale_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    target = tmp_path / "sub-01" / "rest.npz"
    target.parent.mkdir()
    host = socket.gethostname()
    dead_dir = target.with_name(f".rest.npz.tmp-{host}-{_dead_pid()}-abcdef12")  # a killed writer's folder
    dead_dir.mkdir()
    (dead_dir / "part").write_text("partial")
    dead_file = target.with_name(f".rest.npz.tmp-{host}-{_dead_pid()}-0123abcd.npz")  # keep_suffix
    dead_file.write_text("partial")
    alive = temp_path(target)  # this process: may still be writing
    alive.write_text("being written")
    other_host = target.with_name(f".rest.npz.tmp-another-node-{_dead_pid()}-abcdef12")
    other_host.write_text("unknown")
    other_run = target.with_name(f".rest.npz.old.tmp-{host}-{_dead_pid()}-abcdef12")  # not a temporary of target
    other_run.write_text("other")
    assert sorted(remove_stale_temps(target)) == sorted([dead_dir, dead_file])
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([alive.name, other_host.name, other_run.name])
    assert remove_stale_temps(tmp_path / "no_folder" / "x") == []


def test_save_figure_writes_by_suffix_closes_and_leaves_nothing_on_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainfm.io import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "curve.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "curve.unknownformat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"] and not plt.fignum_exists(fig.number)
