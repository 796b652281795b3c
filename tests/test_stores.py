"""Every store honours one interface (a shared conformance test), folder stores open from their run
index without touching the runs, caches stay bounded, and the index tools work."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from brainfm.data.stores import Store, detect_kind, open_store
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.grayordinate import GrayordinateStore, write_grayordinate_run
from brainfm.data.stores.index import IndexWriter, read_index
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.data.stores.synth import synth_rois, synth_volumes
from brainfm.data.stores.view import StoreView
from brainfm.data.stores.volume import VolumeStore, write_volume_run
from brainfm.errors import DataError

RNG = np.random.default_rng(0)
SHAPE = (5, 4, 3)


def _volume_runs():
    """(subject, run, (T, X, Y, Z) float32) of three runs; every voxel is brain (mask rule 'all')."""
    return [(s, r, 100 + RNG.normal(size=(t, *SHAPE)).astype(np.float32))
            for s, r, t in (("sub-a", "rest1", 12), ("sub-a", "rest2", 9), ("sub-b", "rest1", 11))]


def _expected_volume(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / x.std()).astype(np.float16)


def _roi_store(tmp_path):
    series = [RNG.normal(size=(4, t)).astype(np.float32) + 10 for t in (30, 25, 28)]
    path = write_roi_h5(tmp_path / "r.h5", {"a": series}, ["s1", "s1", "s2"], 2.0, {"a": ["r0", "r1", "r2", "r3"]},
                        run_ids=["rest1", "rest2", "rest1"])
    return ROIStore(path, preload=False), [x.T for x in series]


def _foreign_roi_store(tmp_path):  # Brain-Semantoks file: no ts_len, NaN padding, no run statistics
    data = np.full((2, 3, 20), np.nan, dtype=np.float32)
    runs = [RNG.normal(size=(3, 20)).astype(np.float32), RNG.normal(size=(3, 14)).astype(np.float32)]
    for i, x in enumerate(runs):
        data[i, :, : x.shape[1]] = x
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f["timeseries/a"] = data
        f["long_subject_id"] = np.array([b"x1", b"x2"])
        f.attrs["tr"] = 0.8
    return ROIStore(path), [x.T for x in runs]


def _volume_store(tmp_path, indexed: bool):
    root = tmp_path / ("indexed" if indexed else "plain")
    runs = _volume_runs()
    for s, r, x in runs:
        write_volume_run(root, s, r, x, tr=2.0, mask="all")
    if indexed:
        VolumeStore.build_index(root)
    store = VolumeStore(root, cache={"open_runs": 2, "masks": 2})
    assert store.indexed is indexed
    return store, [_expected_volume(x) for _, _, x in runs]


def _frame_store(tmp_path):
    img = tmp_path / "swift" / "img"
    runs = []
    for s, t in (("100206", 7), ("100307", 9)):
        x = RNG.normal(size=(t, *SHAPE)).astype(np.float16)
        (img / s).mkdir(parents=True)
        for k in range(t):
            torch.save(torch.from_numpy(x[k].copy()).unsqueeze(-1), img / s / f"frame_{k}.pt")
        runs.append(x)
    return FrameStore(tmp_path / "swift", tr=0.72), runs


def _grayordinate_store(tmp_path):
    root = tmp_path / "gray"
    runs = []
    for s, r, t in (("s1", "REST1", 10), ("s2", "REST1", 12)):
        x = RNG.normal(size=(t, 16)).astype(np.float32)
        write_grayordinate_run(root, s, r, x, tr=0.72, normalization="none")
        runs.append(x.astype(np.float16))
    GrayordinateStore.build_index(root)
    return GrayordinateStore(root), runs


def _view(tmp_path):
    base, expected = _volume_store(tmp_path, indexed=True)
    return StoreView(base, [2, 0], ["B", "A"]), [expected[2], expected[0]]


STORES = {"roi": _roi_store, "roi_foreign": _foreign_roi_store, "volume": lambda p: _volume_store(p, False),
          "volume_indexed": lambda p: _volume_store(p, True), "frames": _frame_store,
          "grayordinate": _grayordinate_store, "view": _view}


@pytest.mark.parametrize("name", sorted(STORES))
def test_every_store_honours_the_interface(name, tmp_path):
    store, expected = STORES[name](tmp_path)
    assert isinstance(store, Store)
    n = len(store)
    assert n == len(expected) == len(store.subject_ids) == len(store.run_ids) == len(store.trs)
    assert store.lengths.dtype == np.int64 and store.trs.dtype == np.float64
    assert store.lengths.tolist() == [len(x) for x in expected]
    assert store.subjects() == sorted(set(store.subject_ids))
    for i, x in enumerate(expected):
        assert tuple(store.frame_shape) == x.shape[1:]
        got = store.read(i)
        assert got.shape == x.shape
        np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(store.read(i, 2, 7, stride=2), x[2:7:2], rtol=1e-3, atol=1e-3)
        out = np.empty((3, *x.shape[1:]), dtype=got.dtype)
        assert store.read(i, 1, 4, out=out) is out
        np.testing.assert_allclose(out, x[1:4], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(store.read_clip(i, 1, 3, stride=2), x[1:6:2], rtol=1e-3, atol=1e-3)
        assert store.run_stats(i)["n"] == len(x)
        assert store.subject_ids[i] in store.describe_run(i)
        with pytest.raises(IndexError, match=f"outside run {i}"):
            store.read(i, 0, len(x) + 1)
    again = pickle.loads(pickle.dumps(store))  # DataLoader workers receive the store pickled (spawn)
    np.testing.assert_array_equal(again.read(n - 1), store.read(n - 1))


def test_roi_statistics_come_from_the_file_or_are_computed_once(tmp_path):
    store, runs = _roi_store(tmp_path)
    assert store.has_run_stats
    np.testing.assert_allclose(store.run_stats(1)["mean"], runs[1].mean(axis=0), rtol=1e-6)
    foreign, runs = _foreign_roi_store(tmp_path)
    assert not foreign.has_run_stats
    np.testing.assert_allclose(foreign.run_stats(1)["std"], runs[1].std(axis=0), rtol=1e-5)
    from brainfm.data.stores.roi import add_run_stats

    assert add_run_stats(foreign.path) == 1 and ROIStore(foreign.path).has_run_stats


def test_an_indexed_store_opens_without_touching_its_runs(tmp_path):
    store, _ = _volume_store(tmp_path, indexed=True)
    events, active = [], [True]

    def hook(event, args):  # audit hooks cannot be removed: it records only while this test opens the store
        if active[0] and event in ("open", "os.scandir", "os.listdir", "glob.glob"):
            events.append((event, str(args[0]) if args else ""))

    sys.addaudithook(hook)
    VolumeStore(store.root)
    active[0] = False
    opened = [e for e in events if str(store.root) in e[1]]
    assert opened == [], opened  # the index is read by pyarrow (not Python's open); no run folder is listed


def test_lazy_validation_names_a_truncated_run_at_its_first_read(tmp_path):
    store, _ = _volume_store(tmp_path, indexed=True)
    bold = store.path(1) / "bold.npy"
    with open(bold, "r+b") as f:
        f.truncate(bold.stat().st_size - 10)
    reopened = VolumeStore(store.root)  # opening reads the index only: no error yet
    reopened.read(0)
    with pytest.raises(DataError, match=r"sub-a/rest2/bold.npy is truncated"):
        reopened.read(1)
    with pytest.raises(DataError, match="truncated"):
        VolumeStore(store.root, validate=True)


def test_caches_are_bounded(tmp_path):
    store, _ = _volume_store(tmp_path, indexed=True)
    for _ in range(3):
        for i in range(len(store)):
            store.read(i, 0, 2)
            store.mask(i)
    assert len(store._fds) == 2 and len(store._masks) == 2


def test_index_cli_writes_the_index_an_indexless_store_would_scan(tmp_path):
    scanned, _ = _volume_store(tmp_path, indexed=False)
    cli = [sys.executable, "-m", "brainfm.cli.data"]
    subprocess.run([*cli, "index", str(scanned.root)], check=True, capture_output=True)
    indexed = VolumeStore(scanned.root)
    assert indexed.indexed and indexed.subject_ids == scanned.subject_ids and indexed.run_ids == scanned.run_ids
    assert indexed.lengths.tolist() == scanned.lengths.tolist() and indexed.crop_pads() == scanned.crop_pads()
    assert [indexed.run_stats(i) for i in range(3)] == [scanned.run_stats(i) for i in range(3)]
    ok = subprocess.run([*cli, "validate", str(scanned.root)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok: VolumeStore" in ok.stdout
    write_volume_run(scanned.root, "sub-c", "rest1", RNG.normal(size=(8, *SHAPE)).astype(np.float32), tr=2.0)
    bad = subprocess.run([*cli, "validate", str(scanned.root)], capture_output=True, text=True)
    assert bad.returncode != 0 and "sub-c/rest1 is not in" in bad.stderr and "Traceback" not in bad.stderr


def _writer(root, start):
    with IndexWriter(root, "volume", every_rows=3) as w:
        for i in range(start, start + 10):
            w.add({"subject": f"s{i:02d}", "run": "r", "n_frames": i})


def test_index_writers_in_two_processes_merge_every_row(tmp_path):
    procs = [mp.get_context("fork").Process(target=_writer, args=(tmp_path, k * 10)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    index = read_index(tmp_path, "volume")
    assert index["subject"] == [f"s{i:02d}" for i in range(20)] and index["n_frames"].tolist() == list(range(20))


def test_synthetic_stores_open_with_their_index(tmp_path):
    root = synth_volumes(tmp_path / "ukb", 30, 12, (4, 4, 4), tr=0.735, runs_per_subject=2, workers=2, chunk=7)
    store = VolumeStore(root)
    assert store.indexed and len(store) == 30 and len(store.subjects()) == 15 and store.tr == 0.735
    assert store.validate() == [] and detect_kind(root) == "volume"
    x = store.read(29)
    assert x.shape == (12, 4, 4, 4) and np.isfinite(x.astype(np.float32)).all()
    sparse = VolumeStore(synth_volumes(tmp_path / "zeros", 3, 8, (4, 4, 4), data="zeros"))
    assert (sparse.read(2) == 0).all()
    rois = ROIStore(synth_rois(tmp_path / "r.h5", 6, 40, 5, runs_per_subject=3))
    assert len(rois) == 6 and rois.has_run_stats and rois.read(5).shape == (40, 5) and rois.validate() == []
    assert open_store("roi", rois.path).n_rois == 5
