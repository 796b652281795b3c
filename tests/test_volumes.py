"""Volume store, clips, pooled loader, datamodule and the SwiFT frame layout: numbers, shapes and errors."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.datasets.volume import (
    ClipBatchRequest,
    FrameClipDataset,
    VolumeClipDataset,
    VolumeClipLoader,
    build_augmentation,
    collate_windows,
)
from brainfm.data.preprocess.frames import convert_frames
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.rundir import clean_stale_temp
from brainfm.data.stores.volume import (
    CropPad,
    VolumeStore,
    run_is_finished,
    write_volume_run,
)
from brainfm.data.windows import WindowBatchSampler
from brainfm.errors import ConfigError, DataError

SHAPE = (6, 5, 4)


def _run(seed: int, t: int = 30, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Raw BOLD-like frames ``(T, X, Y, Z)`` (mean ~1000 in the brain, 0 outside) and its mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    mask[1:-1, 1:-1, 1:] = True
    data = np.zeros((t, *shape))
    data[:, mask] = 1000 + 50 * rng.standard_normal((t, int(mask.sum()))) + rng.uniform(0, 200, int(mask.sum()))
    return data, mask


@pytest.fixture
def store_root(tmp_path):
    root = tmp_path / "store"
    for s, subject in enumerate(["sub-b", "sub-a"]):
        for r, run in enumerate(["rest1", "rest2"]):
            data, mask = _run(10 * s + r, t=30 + 4 * r)
            write_volume_run(root, subject, run, data, tr=2.0, mask=mask, affine=np.eye(4), source=f"{subject}_{run}")
    return root


def _segments(store):
    return [(i, 0, int(n)) for i, n in enumerate(store.lengths)]


# -- writer ------------------------------------------------------------------------------------------
def test_writer_normalizes_globally_and_fills_background_with_the_minimum(tmp_path):
    data, mask = _run(0)
    path = write_volume_run(tmp_path, "sub-01", "rest", data, tr=0.72, mask=mask, affine=np.diag([2.0, 2, 2, 1]),
                            crop_pad=CropPad((1, 1), (0, 2), (0, 0)))
    bold = np.load(path / "bold.npy", mmap_mode="r")
    assert isinstance(bold, np.memmap) and bold.dtype == np.float16 and bold.flags.c_contiguous
    assert bold.shape == (30, 8, 7, 4)
    meta = json.loads((path / "meta.json").read_text())
    brain = data[:, mask]
    assert meta["global_mean"] == pytest.approx(brain.mean(), rel=1e-9)
    assert meta["global_std"] == pytest.approx(brain.std(), rel=1e-9)
    out_mask = np.load(path / "mask.npy")
    assert out_mask.shape == (8, 7, 4) and out_mask.sum() == mask.sum()
    assert out_mask[1 + 1, 1, 1] and not out_mask[0].any()  # shifted by the padding before X
    z = bold[:, out_mask].astype(np.float64)
    assert abs(z.mean()) < 1e-3 and z.std() == pytest.approx(1.0, abs=1e-3)
    expected = np.float16((brain.min() - brain.mean()) / brain.std())
    assert meta["fill"] == "min" and meta["fill_value"] == float(expected) == meta["min"] == float(z.min())
    assert (bold[:, ~out_mask] == expected).all()  # background and padding
    assert meta["tr"] == 0.72 and meta["n_frames"] == 30 and meta["original_shape"] == [6, 5, 4, 30]
    assert meta["crop_pad"] == [[1, 1], [0, 2], [0, 0]] and meta["normalization"] == "global"
    np.testing.assert_allclose(meta["affine"], [[2, 0, 0, -2], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    vm, vs = np.load(path / "voxel_mean.npy"), np.load(path / "voxel_std.npy")
    assert vm.dtype == vs.dtype == np.float32
    np.testing.assert_allclose(vm[out_mask], z.mean(axis=0), atol=2e-3)
    np.testing.assert_allclose(vs[out_mask], z.std(axis=0), rtol=2e-3)
    assert (vs[~out_mask] == 0).all() and (vm[~out_mask] == expected).all()


def test_writer_fill_zero_normalization_none_and_fp16_overflow(tmp_path):
    data, mask = _run(1)
    path = write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask=mask, normalization="none", fill="zero")
    bold = np.load(path / "bold.npy")
    assert (bold[:, ~mask] == 0).all()
    np.testing.assert_array_equal(bold[:, mask], data[:, mask].astype(np.float16))
    with pytest.raises(DataError, match="do not fit float16.*--normalization global"):
        write_volume_run(tmp_path, "s", "big", data * 100, tr=1.0, mask=mask, normalization="none")
    assert not (tmp_path / "s" / "big").exists() and [p.name for p in (tmp_path / "s").iterdir()] == ["r"]


def test_nan_frames_are_named_and_nothing_is_left(tmp_path):
    data, mask = _run(2)
    data[3, 2, 2, 2] = np.nan
    data[7, 2, 2, 3] = np.inf
    with pytest.raises(DataError, match=r"voxel\(s\) at TR\(s\) 3, 7 \(of 30"):
        write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask="auto", source="bad.nii.gz")
    assert not (tmp_path / "s").exists()  # checked before anything is written
    data, mask = _run(2)
    data[:, 0, 0, 0] = np.nan  # NaN at every TR: background (as SPM writes outside its mask)
    path = write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask="auto")
    assert not np.load(path / "mask.npy")[0, 0, 0]
    assert np.isfinite(np.load(path / "bold.npy")).all()


def test_mask_rules(tmp_path):
    data, mask = _run(3)
    nonzero = write_volume_run(tmp_path, "s", "a", data, tr=1.0, mask="auto")  # >= 5 % zero voxels: nonzero
    np.testing.assert_array_equal(np.load(nonzero / "mask.npy"), mask)
    assert json.loads((nonzero / "meta.json").read_text())["mask"]["rule"] == "nonzero"
    noisy = data + 30.0  # raw EPI: a low, non-zero background
    thr = write_volume_run(tmp_path, "s", "b", noisy, tr=1.0, mask="auto")
    np.testing.assert_array_equal(np.load(thr / "mask.npy"), mask)
    assert json.loads((thr / "meta.json").read_text())["mask"]["rule"].startswith("threshold")
    with pytest.raises(DataError, match="brain mask .* is empty"):
        write_volume_run(tmp_path, "s", "c", data, tr=1.0, mask=np.zeros(SHAPE, dtype=bool))
    with pytest.raises(DataError, match="brain mask has shape"):
        write_volume_run(tmp_path, "s", "d", data, tr=1.0, mask=np.ones((2, 2, 2), dtype=bool))


def test_atomic_write_and_resume(tmp_path, monkeypatch):
    import brainfm.data.stores.volume as vs

    data, mask = _run(4)
    calls = {"n": 0}
    real = vs.save_npy

    def crash(path, array):
        calls["n"] += 1
        if calls["n"] == 2:  # bold.npy and mask.npy written, then the job dies
            raise KeyboardInterrupt("killed")
        real(path, array)

    monkeypatch.setattr(vs, "save_npy", crash)
    with pytest.raises(KeyboardInterrupt):
        write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask=mask)
    assert list((tmp_path / "s").iterdir()) == []  # neither the run nor its temporary folder
    monkeypatch.setattr(vs, "save_npy", real)
    # a temporary folder of a writer that was killed (dead pid on this host) is ignored and cleaned
    stale = tmp_path / "s" / f".r.tmp-{socket.gethostname()}-999999999-abcdef12"
    stale.mkdir()
    (stale / "bold.npy").write_bytes(b"partial")
    path = write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask=mask)
    assert not stale.exists() and run_is_finished(path)
    mtime = (path / "bold.npy").stat().st_mtime_ns
    assert write_volume_run(tmp_path, "s", "r", data * 2, tr=1.0, mask=mask) == path  # finished: kept
    assert (path / "bold.npy").stat().st_mtime_ns == mtime
    write_volume_run(tmp_path, "s", "r", data * 2 + 5, tr=3.0, mask=mask, overwrite=True)
    assert json.loads((path / "meta.json").read_text())["tr"] == 3.0
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["r"]
    assert clean_stale_temp(tmp_path, "s", "r") == []


def test_crop_pad_tuples_and_presets():
    from brainfm.data.preprocess.volumes import CROP_PAD_PRESETS

    hcp = CropPad.from_torch_pad((8, 7, 2, 1, 11, 10))  # SwiFT's tuple lists Z first
    assert hcp.pairs == ((11, 10), (2, 1), (8, 7))
    assert hcp.output_shape((75, 93, 81)) == (96, 96, 96)
    assert CROP_PAD_PRESETS["swift_abcd_rest"].output_shape((79, 97, 85)) == (96, 96, 96)
    assert CROP_PAD_PRESETS["swift_ukb"].output_shape((91, 109, 91)) == (96, 96, 96)
    c = CropPad.centred((75, 93, 100), (96, 96, 96))
    assert c.pairs == ((10, 11), (1, 2), (-2, -2))
    src, dst = c.slices((75, 93, 100))
    assert src == (slice(0, 75), slice(0, 93), slice(2, 98)) and dst == (slice(10, 85), slice(1, 94), slice(0, 96))
    with pytest.raises(ConfigError, match="6 integers"):
        CropPad.from_axis_order([1, 2, 3])


# -- store -------------------------------------------------------------------------------------------
def test_store_index_and_clips(store_root):
    store = VolumeStore(store_root)
    assert store.subject_ids == ["sub-a", "sub-a", "sub-b", "sub-b"] and store.run_ids == ["rest1", "rest2"] * 2
    assert store.lengths.tolist() == [30, 34, 30, 34] and store.tr == 2.0 and store.shape == SHAPE
    full = np.load(store_root / "sub-b" / "rest2" / "bold.npy")
    view = store.read_clip(3, 5, 4, stride=3)
    assert view.shape == (4, *SHAPE) and view.dtype == np.float16 and not view.flags.writeable
    np.testing.assert_array_equal(view, full[5:15:3])
    out = np.empty((4, *SHAPE), dtype=np.float16)
    assert store.read_clip(3, 5, 4, stride=3, out=out) is out
    np.testing.assert_array_equal(out, full[5:15:3])
    with pytest.raises(IndexError, match="outside run 3"):
        store.read_clip(3, 30, 2, stride=4)


def test_store_written_with_the_old_spelling_still_reads(store_root):
    """Stores written before the rename carry ``normalisation`` in meta.json and in the index."""
    import pyarrow.parquet as pq

    for meta_path in sorted(store_root.glob("*/*/meta.json")):
        meta = json.loads(meta_path.read_text())
        meta["normalisation"] = meta.pop("normalization")
        meta_path.write_text(json.dumps(meta))
    VolumeStore.build_index(store_root)  # write_volume_run alone leaves no index
    table = pq.read_table(store_root / "index.parquet")
    old = [n if n != "normalization" else "normalisation" for n in table.column_names]
    pq.write_table(table.rename_columns(old).replace_schema_metadata(table.schema.metadata), store_root / "index.parquet")
    store = VolumeStore(store_root)
    assert store.column("normalization") == ["global"] * 4 and store.run_stats(0)["normalization"] == "global"
    assert store.meta(0)["normalization"] == "global" and "normalisation" not in store.meta(0)


def test_truncated_or_mismatched_files_are_named(store_root):
    bold = store_root / "sub-a" / "rest2" / "bold.npy"
    with open(bold, "r+b") as f:
        f.truncate(bold.stat().st_size - 100)
    with pytest.raises(DataError, match=r"sub-a/rest2/bold.npy is truncated.*re-run brainfm-preprocess"):
        VolumeStore(store_root)
    bold.unlink()
    with pytest.raises(DataError, match="bold.npy is missing"):
        VolumeStore(store_root)
    meta_path = store_root / "sub-b" / "rest1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["n_frames"] = 31
    meta_path.write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(store_root / "sub-a" / "rest2")
    with pytest.raises(DataError, match=r"holds float16 \(30, 6, 5, 4\) but meta.json says float16 \(31, 6, 5, 4\)"):
        VolumeStore(store_root)
    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="meta.json is unreadable"):
        VolumeStore(store_root)


def test_missing_store_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="brainfm-preprocess volumes"):
        VolumeStore(tmp_path / "nope")


# -- clips -----------------------------------------------------------------------------------------------
def test_clip_grid_strides_and_times(store_root):
    store = VolumeStore(store_root)
    ds = VolumeClipDataset(store, [(2, 2, 20)], length=4, stride=2, clip_stride=3)
    # span (4 - 1) * 2 + 1 = 7 TRs: starts 2, 5, 8, 11 (14 + 7 > 20). SwiFT would read clip_stride
    # (3) frames per clip and allow starts up to 20 - 8.
    assert [ds.clip(i) for i in range(len(ds))] == [(2, 2), (2, 5), (2, 8), (2, 11)]
    s = ds[1]
    assert s["volume"].shape == (1, *SHAPE, 4) and s["volume"].dtype == torch.float16
    np.testing.assert_array_equal(s["volume"][0].permute(3, 0, 1, 2).numpy(), store.read_clip(2, 5, 4, 2))
    torch.testing.assert_close(s["t"], torch.tensor([0.0, 4.0, 8.0, 12.0]))
    assert s["onset"] == 10.0 and s["run"] == 2 and s["subject"] == 1  # sub-b after sub-a
    assert s["brain_mask"].dtype == torch.bool and s["brain_mask"].sum() == store.mask(2).sum()
    default = VolumeClipDataset(store, [(0, 0, 30)], length=5, stride=2)  # non-overlapping: every 10 TRs
    assert [default.clip(i)[1] for i in range(len(default))] == [0, 10, 20]
    short = ds[(1, 2)]
    assert short["volume"].shape[-1] == 2
    with pytest.raises(ConfigError, match="spans 39 TRs, longer than every segment"):
        VolumeClipDataset(store, [(0, 0, 30)], length=20, stride=2)


def test_pair_clips_never_overlap(store_root):
    store = VolumeStore(store_root)
    ds = VolumeClipDataset(store, [(1, 4, 34)], length=5, stride=2, clip_stride=1)
    span = 9
    for seed in range(40):
        i = seed % len(ds)
        s = ds[(i, 5, seed)]
        a, b = s["onset"] / 2.0, s["onset2"] / 2.0
        assert abs(a - b) >= span and 4 <= b <= 34 - span, (a, b)
        np.testing.assert_array_equal(s["volume2"][0].permute(3, 0, 1, 2).numpy(), store.read_clip(1, int(b), 5, 2))


def test_load_time_normalizations(store_root):
    store = VolumeStore(store_root)
    seg = [(0, 0, 30)]
    mask = torch.from_numpy(store.mask(0))
    vox = VolumeClipDataset(store, seg, length=30, normalization="voxel")[0]["volume"][0].float()
    brain = vox[mask]  # (voxels, T)
    assert brain.mean(dim=1).abs().max() < 0.01 and (brain.std(dim=1, unbiased=False) - 1).abs().max() < 0.01
    assert (vox[~mask] == 0).all()
    mm = VolumeClipDataset(store, seg, length=30, normalization="minmax")[0]["volume"][0].float()
    assert mm[mask].min() == 0 and mm[mask].max() == pytest.approx(1, abs=1e-3) and (mm[~mask] == 0).all()
    two = VolumeClipDataset(store, seg, length=30, normalization="stored+voxel")[0]["volume"]
    assert two.shape == (2, *SHAPE, 30)
    torch.testing.assert_close(two[1].float(), vox)
    with pytest.raises(ConfigError, match="not one of"):
        VolumeClipDataset(store, seg, length=4, normalization="robust")


def _batches(loader, epochs=2, hold=False):
    out, held = [], []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        for b in loader:
            out.append({k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()})
            if hold:
                held.append(b)
    return out, held


@pytest.mark.parametrize("workers", [0, 2])
def test_pooled_loader_matches_samples_and_never_overwrites_a_held_batch(store_root, workers):
    store = VolumeStore(store_root)
    ds = VolumeClipDataset(store, _segments(store), length=6, clip_stride=2)
    sampler = WindowBatchSampler(len(ds), 3, 6, seed=1, pairs=True)
    loader = VolumeClipLoader(ds, sampler, max_batch=3, num_workers=workers, persistent_workers=workers > 0)
    copies, held = _batches(loader, hold=True)
    assert loader.pool.misses > 0  # every buffer held: fresh memory instead of overwriting
    for c, b in zip(copies, held):
        for k in ("volume", "volume2", "brain_mask"):
            assert torch.equal(c[k], b[k])
    sampler.set_epoch(0)
    first_requests = next(iter(sampler))
    expected = collate_windows([ds[r] for r in first_requests])
    for k in ("volume", "volume2", "t", "t2", "onset", "onset2", "subject", "run", "brain_mask"):
        assert torch.equal(copies[0][k], expected[k]), k
    assert copies[0]["volume"].shape == (3, 1, *SHAPE, 6)
    del held
    before = loader.pool.hits
    _batches(loader)  # nothing held: buffers are reused
    assert loader.pool.hits - before >= len(sampler) * 2 - 1


def test_plain_dataloader_and_fresh_batches(store_root):
    store = VolumeStore(store_root)
    ds = VolumeClipDataset(store, _segments(store), length=6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_windows)))
    assert batch["volume"].shape == (2, 1, *SHAPE, 6) and batch["t"].shape == (2, 6)
    fresh = ds.__getitems__(ClipBatchRequest(((0, 6), (1, 6)), slot=None, seed=0))
    assert torch.equal(fresh["volume"], batch["volume"]) and collate_windows(fresh) is fresh


def test_augmentation_moves_every_frame_alike(tmp_path):
    frame = np.zeros((1, 12, 12, 12))
    frame[0, 3:6, 4:9, 2:10] = 5.0
    data = np.repeat(frame, 6, axis=0) + np.arange(6)[:, None, None, None] * 1e-3 * (frame > 0)
    write_volume_run(tmp_path, "s", "r", data, tr=1.0, mask="nonzero", normalization="none", fill="zero")
    store = VolumeStore(tmp_path)
    aug = build_augmentation({"affine": {"prob": 1.0, "rotate_range": [0.5, 0.5, 0.5], "translate_range": [2, 2, 2]}})
    plain = VolumeClipDataset(store, [(0, 0, 6)], length=6)[0]["volume"][0].float()
    moved = VolumeClipDataset(store, [(0, 0, 6)], length=6, transform=aug)[0]["volume"][0].float()
    assert not torch.allclose(moved, plain)
    for k in range(1, 6):  # frames differ by < 0.01 before, so they must after: one transform per clip
        assert (moved[..., k] - moved[..., 0]).abs().max() < 0.02
    assert build_augmentation(None) is None


# -- datamodule -----------------------------------------------------------------------------------------
def _dm(root, **kw):
    kw.setdefault("window", {"length": 6})
    return VolumeDataModule(name="toy", path=str(root), **kw)


def test_datamodule_checks_and_meta(store_root, tmp_path):
    dm = _dm(store_root, tr=2.0, shape=list(SHAPE), normalization={"stored": "global", "fill": "min"})
    dm.setup()
    meta = dm.meta
    assert meta["tr"] == 2.0 and meta["shape"] == list(SHAPE) and meta["in_chans"] == 1
    norm = meta["normalization"]
    assert {k: norm[k] for k in ("stored", "fill", "load")} == {"stored": ["global"], "fill": ["min"], "load": "stored"}
    assert meta["orientation"] == "RAS"  # the writer's affine (identity) without --orientation: stored as it lies
    # the training runs' global statistics, pooled over brain voxels x training TRs (first half of each run)
    stats, rows = norm["training_statistics"], [dm.store.run_stats(i) for i in range(4)]
    w = np.array([r["n"] // 2 * r["brain_voxels"] for r in rows], float)
    mu = np.array([r["global_mean"] for r in rows])
    sd = np.array([r["global_std"] for r in rows])
    assert stats["stored"] == "global" and stats["runs"] == 4 and stats["voxel"] is False
    assert stats["global_mean"] == pytest.approx((w * mu).sum() / w.sum())
    pooled_var = (w * (sd**2 + mu**2)).sum() / w.sum() - stats["global_mean"] ** 2
    assert stats["global_std"] == pytest.approx(np.sqrt(pooled_var))
    assert meta["n_subjects"] == 2 and meta["window_length"] == 6
    json.dumps(meta)  # plain containers only
    batch = next(iter(dm.train_dataloader()))
    assert batch["volume"].shape == (4, 1, *SHAPE, 6) and batch["brain_mask"].shape == (4, *SHAPE)
    with pytest.raises(ConfigError, match=r"TR mismatch: subject sub-a .* TR=2 s but data.tr=0.72"):
        _dm(store_root, tr=0.72).setup()
    with pytest.raises(ConfigError, match=r"grid mismatch.*\(6, 5, 4\).*--target-shape 96 96 96"):
        _dm(store_root, shape=[96, 96, 96]).setup()
    with pytest.raises(ConfigError, match="written with normalization='global' but data.normalization.stored='none'"):
        _dm(store_root, normalization={"stored": "none"}).setup()
    with pytest.raises(ConfigError, match="longer than every segment"):
        _dm(store_root, window={"length": 20}).setup()
    dm = _dm(store_root, split={"kind": "subject", "fractions": [0.5, 0.5, 0.0], "seed": 0},
             split_dir=str(tmp_path / "splits"))
    dm.setup()
    assert dm.split_file.is_file() and dm.split_file.name.startswith("seed0_2subjects_")
    ids = {k: {dm.store.subject_ids[r] for r, _, _ in dm.segments[k]} for k in ("train", "val")}
    assert len(ids["train"]) == len(ids["val"]) == 1 and ids["train"].isdisjoint(ids["val"])
    with pytest.raises(ConfigError, match="data.window.min_length=1"):
        _dm(store_root, window={"length": 6, "min_length": 1}).setup()


def test_datamodule_mixed_tr(tmp_path):
    for tr, subject in ((2.0, "a"), (1.35, "b")):
        data, mask = _run(7)
        write_volume_run(tmp_path, subject, "r", data, tr=tr, mask=mask)
    with pytest.raises(ConfigError, match="different TRs.*data.tr=mixed"):
        _dm(tmp_path).setup()
    dm = _dm(tmp_path, tr="mixed")
    dm.setup()
    assert dm.meta["tr"] == "mixed" and dm.meta["trs"] == [1.35, 2.0]
    ds = dm.dataset("val")
    times = {int(ds[i]["run"]): ds[i]["t"][1].item() for i in range(len(ds))}
    assert times == {0: 2.0, 1: pytest.approx(1.35)}


def test_datamodule_resume_skips_consumed_batches(store_root):
    dm = _dm(store_root, window={"length": 4, "train_stride": 1}, batch_size=2)
    dm.setup()
    full = [b["run"].tolist() + b["onset"].tolist() for b in dm.train_dataloader()]
    dm2 = _dm(store_root, window={"length": 4, "train_stride": 1}, batch_size=2)
    dm2.load_state_dict({"train_epoch": 0, "train_batches_done": 3})
    resumed = [b["run"].tolist() + b["onset"].tolist() for b in dm2.train_dataloader()]
    assert resumed == full[3:]


# -- SwiFT frame layout ------------------------------------------------------------------------------------
def _swift_frames(root, subject, data):
    folder = root / "img" / subject
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(data):  # as SwiFT's preprocessing.py: torch.split(.., 1, 3) -> (X, Y, Z, 1) fp16
        torch.save(torch.from_numpy(frame.astype(np.float16))[..., None].clone(), folder / f"frame_{t}.pt")


def _normalized(seed, t=12):
    data, mask = _run(seed, t=t)
    z = (data - data[:, mask].mean()) / data[:, mask].std()
    z[:, ~mask] = z[:, mask].min()
    return z, mask


def test_frames_count_every_tr_and_convert(tmp_path):
    a, mask = _normalized(0)
    b, _ = _normalized(1, t=9)
    _swift_frames(tmp_path / "swift", "100307", a)
    _swift_frames(tmp_path / "swift", "100408", b)
    fs = FrameStore(tmp_path / "swift", tr=0.72)
    # no voxel_mean.pt/voxel_std.pt: SwiFT's len(os.listdir) - 2 would count 10 and 7
    assert fs.subject_ids == ["100307", "100408"] and fs.lengths.tolist() == [12, 9] and fs.shape == SHAPE
    ds = FrameClipDataset(tmp_path / "swift", tr=0.72, length=4, stride=2)
    assert [ds.clip(i) for i in range(len(ds))] == [(0, 0), (1, 0)]  # span 7: one clip per subject
    s = ds[1]
    np.testing.assert_array_equal(s["volume"][0].permute(3, 0, 1, 2).numpy(), b[[0, 2, 4, 6]].astype(np.float16))
    torch.testing.assert_close(s["t"], torch.tensor([0.0, 1.44, 2.88, 4.32]))
    np.testing.assert_array_equal(fs.read_clip(0, 1, 3, stride=4), a[[1, 5, 9]].astype(np.float16))
    assert "brain_mask" not in s
    results = convert_frames(tmp_path / "swift", tmp_path / "store", tr=0.72, progress=False)
    assert [r.status for r in results] == ["written", "written"]
    store = VolumeStore(tmp_path / "store")
    np.testing.assert_array_equal(store.read_clip(0, 0, 12), a.astype(np.float16))
    np.testing.assert_array_equal(store.mask(0), mask)
    meta = store.meta(0)
    assert meta["normalization"] == "global" and meta["fill"] == "min" and meta["tr"] == 0.72
    assert meta["fill_value"] == float(np.float16(a[:, mask].min()))
    assert [r.status for r in convert_frames(tmp_path / "swift", tmp_path / "store", tr=0.72, progress=False)] == ["skipped"] * 2
    os.remove(tmp_path / "swift" / "img" / "100408" / "frame_4.pt")
    with pytest.raises(DataError, match=r"100408: frames must be numbered 0..T-1 without gaps; missing frame_4.pt"):
        FrameStore(tmp_path / "swift", tr=0.72)


def test_frames_cli(tmp_path, capsys):
    from brainfm.cli.preprocess import main

    a, _ = _normalized(3)
    _swift_frames(tmp_path / "swift", "s1", a)
    main(["frames", "--input", str(tmp_path / "swift"), "--output", str(tmp_path / "store"), "--tr", "0.8",
          "--target-shape", "8", "8", "6", "--no-progress"])
    out = capsys.readouterr().out
    assert "wrote 1 subject(s)" in out and "shape=(8, 8, 6)" in out
    with pytest.raises(SystemExit) as info:
        main(["frames", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--tr", "1"])
    assert info.value.code == 2 and "frame folder" in capsys.readouterr().err
