"""ROI store, z-scoring, windows, sampler and splits: numbers, shapes and the errors users hit."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import synthetic_series

from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.datasets.roi import ROIWindowDataset
from brainfm.data.normalization import ROINormalizer
from brainfm.data.splits import (
    draw_subject_split,
    load_or_create_subject_split,
    read_split_file,
    time_split,
    write_split_file,
)
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.data.windows import WindowBatchSampler, collate_windows
from brainfm.errors import ConfigError, DataError


def _dm(path, **kw):
    return ROIDataModule(name="toy", path=str(path), **kw)


# -- store ---------------------------------------------------------------------------------------
def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="brainfm-data fetch hcp_rest_roi"):
        ROIStore(tmp_path / "nope.h5")


def test_truncated_file(small_h5, tmp_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(small_h5.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated"):
        ROIStore(cut)


def test_nan_padding_defines_run_length_without_ts_len(tmp_path):
    data = np.random.default_rng(0).normal(size=(2, 3, 50)).astype(np.float32)
    data[1, :, 40:] = np.nan
    path = tmp_path / "pad.h5"
    with h5py.File(path, "w") as f:
        f["timeseries/a"] = data
        f["long_subject_id"] = np.array([b"s1", b"s2"])
        f.attrs["tr"] = 0.8
    store = ROIStore(path)
    assert list(store.lengths) == [50, 40]
    assert store.read(1).shape == (40, 3)


def _read_every_window(dm):
    dm.setup()
    ds = dm.dataset("train", stride=1)
    for i in range(len(ds)):
        ds[i]


def test_nan_inside_a_run_names_subject_roi_and_tr(small_h5, tmp_path):
    with h5py.File(small_h5, "a") as f:
        f["timeseries/toy"][2, 3, 17] = np.nan
    with pytest.raises(DataError, match=r"sub-02.*'roi3'.*TR\(s\) 17"):
        _read_every_window(_dm(small_h5))  # found when a window of the run is read: setup reads no run


def test_nan_in_a_file_without_run_statistics_is_found_when_the_run_is_first_used(tmp_path):
    data = np.stack(synthetic_series(2, n_trs=80)).astype(np.float32)
    data[1, 4, 30] = np.nan
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:  # a Brain-Semantoks file: no /run_stats
        f["timeseries/a"] = data
        f["long_subject_id"] = np.array([b"s1", b"s2"])
        f.attrs["tr"] = 2.0
    store = ROIStore(path)
    assert not store.has_run_stats and store.run_stats(0)["n"] == 80
    with pytest.raises(DataError, match=r"s2.*#4.*TR\(s\) 30"):
        store.run_stats(1)


def test_constant_roi_is_an_error(tmp_path):
    series = synthetic_series(3)
    series[1][0, :] = 5.0
    path = write_roi_h5(tmp_path / "c.h5", {"toy": series}, ["a", "b", "c"], 2.0, {"toy": [f"roi{i}" for i in range(6)]})
    with pytest.raises(DataError, match=r"ROI 'roi0'.*constant in subject b"):
        _read_every_window(_dm(path))


def test_tr_mismatch(small_h5):
    with pytest.raises(ConfigError, match=r"TR mismatch.*TR=2 s.*data.tr=0.72"):
        _dm(small_h5, tr=0.72).setup()


def test_roi_count_mismatch(small_h5):
    with pytest.raises(ConfigError, match=r"has 6 ROIs but data.n_rois=94"):
        _dm(small_h5, n_rois=94).setup()


def test_writer_refuses_nan_and_leaves_nothing(tmp_path):
    bad = synthetic_series(2)
    bad[1][0, 5] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        write_roi_h5(tmp_path / "x.h5", {"a": bad}, ["a", "b"], 1.0, {"a": [f"r{i}" for i in range(6)]})
    assert list(tmp_path.iterdir()) == []


# -- z-scoring -------------------------------------------------------------------------------------
def test_run_zscore_gives_zero_mean_unit_std(small_h5):
    store = ROIStore(small_h5)
    norm = ROINormalizer.fit(store, "run")
    z = norm.apply(2, store.read(2))
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-4)


def test_global_zscore_pools_training_trs_only(small_h5):
    store = ROIStore(small_h5)
    train = [(0, 0, 100), (1, 0, 100)]
    norm = ROINormalizer.fit(store, "global", train_segments=train)
    pooled = np.concatenate([store.read(0, 0, 100), store.read(1, 0, 100)], axis=0)
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(norm.std, pooled.std(axis=0), rtol=1e-4)
    restored = ROINormalizer.from_state(norm.state(), store=store)
    np.testing.assert_array_equal(restored.apply(3, store.read(3)), norm.apply(3, store.read(3)))


# -- windows and sampler ---------------------------------------------------------------------------
def test_grid_windows_carry_time_in_seconds(small_h5):
    store = ROIStore(small_h5)
    norm = ROINormalizer.fit(store, "run")
    ds = ROIWindowDataset(store, norm, [(1, 20, 120)], length=30, stride=25)
    assert [ds.window(i) for i in range(len(ds))] == [(1, 20), (1, 45), (1, 70)]  # 95 + 30 > 120
    s = ds[1]
    assert s["bold"].shape == (30, 6)
    torch.testing.assert_close(s["t"], torch.arange(30) * 2.0)
    assert s["onset"] == 45 * 2.0 and s["run"] == 1
    np.testing.assert_allclose(s["bold"].numpy(), norm.apply(1, store.read(1, 45, 75)), rtol=1e-6)


def test_window_longer_than_every_segment(small_h5):
    store = ROIStore(small_h5)
    with pytest.raises(ConfigError, match="longer than every segment"):
        ROIWindowDataset(store, ROINormalizer.fit(store, "run"), [(0, 0, 50)], length=60)


def test_sampler_is_deterministic_resumable_and_sharded(monkeypatch):
    sampler = WindowBatchSampler(103, batch_size=8, length=40, min_length=10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 103 // 8
    assert all(10 <= b[0][1] <= 40 and len({r[1] for r in b}) == 1 for b in full)  # one length per batch
    again = list(sampler)
    assert full == again
    sampler.fast_forward(2, 5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the skip applies once
    sampler.fast_forward(1, 5)  # another epoch: no skip
    assert list(sampler) == full
    # two ranks see disjoint halves of the same permutation
    import brainfm.data.windows as w

    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(w, "dist_rank_world", lambda r=rank: (r, 2))
        shards.append({i for b in sampler for i, _ in b})
    assert not shards[0] & shards[1]


def test_collate_stacks_batch(small_h5):
    store = ROIStore(small_h5)
    ds = ROIWindowDataset(store, ROINormalizer.fit(store, "run"), [(0, 0, 200), (3, 0, 200)], length=50)
    batch = collate_windows([ds[(0, 20)], ds[(5, 20)]])
    assert batch["bold"].shape == (2, 20, 6) and batch["t"].shape == (2, 20)
    assert batch["subject"].tolist() == [0, 3]


# -- splits ---------------------------------------------------------------------------------------
def test_time_split_halves():
    split = time_split([1200, 1000], 0.5)
    assert split["train"] == [(0, 0, 600), (1, 0, 500)]
    assert split["val"] == [(0, 600, 1200), (1, 500, 1000)]


def test_time_split_without_val_fraction_validates_on_the_rest_and_has_no_test():
    split = time_split([1200, 1000, 7], 0.5, None)
    assert split["train"] == [(0, 0, 600), (1, 0, 500), (2, 0, 4)]  # round(3.5) = 4
    assert split["val"] == [(0, 600, 1200), (1, 500, 1000), (2, 4, 7)]
    assert split["test"] == []
    assert time_split([1200, 1000], 0.5, None) == time_split([1200, 1000], 0.5)


def test_time_split_with_val_fraction_leaves_the_rest_for_testing():
    split = time_split([1200, 1000], 0.4, 0.1)
    assert split["train"] == [(0, 0, 480), (1, 0, 400)]
    assert split["val"] == [(0, 480, 600), (1, 400, 500)]
    assert split["test"] == [(0, 600, 1200), (1, 500, 1000)]
    # the bench's later-time protocol: TRs [0, 350) train and [350, 400) validate on 600-TR first halves
    assert time_split([600], 350 / 600, 50 / 600) == {"train": [(0, 0, 350)], "val": [(0, 350, 400)],
                                                      "test": [(0, 400, 600)]}
    # train + val = 1 (up to rounding): no empty test segment
    assert time_split([1200], 0.7, 0.3) == {"train": [(0, 0, 840)], "val": [(0, 840, 1200)], "test": []}


@pytest.mark.parametrize("train_fraction,val_fraction", [(0.4, 0.0), (0.4, -0.1), (0.5, 0.6), (0.9, 0.2)])
def test_time_split_refuses_a_bad_val_fraction(train_fraction, val_fraction):
    with pytest.raises(ConfigError, match=rf"data.split.val_fraction={val_fraction} must be positive and at most "
                                          rf"1 - data.split.train_fraction \({1 - train_fraction:g}\)"):
        time_split([1200], train_fraction, val_fraction)


def test_datamodule_time_split_keeps_validation_inside_the_first_half(cfg_for):
    """``data.split.train_fraction=0.4 data.split.val_fraction=0.1``: training windows in TRs [0, 480), every
    validation window (and its pair) in [480, 600) of each 1200-TR run; the second half is the test."""
    from hydra.utils import instantiate

    cfg = cfg_for("data=hcp_rest_roi", "data.split.train_fraction=0.4", "data.split.val_fraction=0.1",
                  "data.pairs=true", "data.window.length=50", "data.window.min_length=null")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    n_runs = len(dm.store.lengths)
    assert n_runs == 7 and set(dm.store.lengths) == {1200}
    assert dm.segments["train"] == [(r, 0, 480) for r in range(n_runs)]
    assert dm.segments["val"] == [(r, 480, 600) for r in range(n_runs)]
    assert dm.segments["test"] == [(r, 600, 1200) for r in range(n_runs)]
    val = dm.dataset("val")
    starts = [val.window(i)[1] for i in range(len(val))]
    assert len(starts) == n_runs * 2 and all(480 <= s and s + 50 <= 600 for s in starts)  # [480, 530), [530, 580)
    train = dm.dataset("train", stride=1)
    assert max(train.window(i)[1] for i in range(len(train))) + 50 == 480
    tr, seen = 0.72, 0
    for batch in dm.val_dataloader():
        for key, length in (("onset", batch["bold"].shape[1]), ("onset2", batch["bold2"].shape[1])):
            onset_trs = (batch[key] / tr).round()
            assert torch.all(onset_trs >= 480) and torch.all(onset_trs + length <= 600), key
        seen += batch["bold"].shape[0]
    assert seen == len(val)


def test_subject_split_is_seeded_disjoint_and_complete():
    subjects = [f"s{i}" for i in range(20)]
    a = draw_subject_split(subjects, [0.7, 0.15, 0.15], seed=1)
    assert a == draw_subject_split(subjects, [0.7, 0.15, 0.15], seed=1)
    assert a != draw_subject_split(subjects, [0.7, 0.15, 0.15], seed=2)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(subjects)
    assert [len(a[k]) for k in ("train", "val", "test")] == [14, 3, 3]


def test_split_file_round_trip_and_no_silent_regeneration(tmp_path):
    f = tmp_path / "seed0.txt"
    split = load_or_create_subject_split(f, ["a", "b", "c", "d", "e"], (0.6, 0.2, 0.2), seed=0)
    assert f.read_text().splitlines()[0] == "train_subjects"
    assert read_split_file(f) == split
    assert load_or_create_subject_split(f, ["a", "b", "c", "d", "e"], (0.2, 0.4, 0.4), seed=9) == split
    with pytest.raises(DataError, match="does not list 1 subject"):
        load_or_create_subject_split(f, ["a", "b", "c", "d", "e", "f"])


def test_subject_in_two_splits_is_an_error(tmp_path):
    f = write_split_file(tmp_path / "s.txt", {"train": ["a", "b"], "val": ["b"], "test": ["c"]})
    with pytest.raises(DataError, match=r"'b' is listed in both 'train' and 'val'"):
        read_split_file(f)


def test_datamodule_subject_split_writes_file(small_h5, tmp_path):
    dm = _dm(small_h5, split={"kind": "subject", "fractions": [0.5, 0.25, 0.25], "seed": 0},
             split_dir=str(tmp_path / "splits"), window={"length": 50})
    dm.setup()
    assert dm.split_file.parent == tmp_path / "splits" and dm.split_file.name.startswith("seed0_4subjects_")
    assert dm.split_file.is_file()
    subjects = {k: {dm.store.subject_ids[r] for r, _, _ in v} for k, v in dm.segments.items()}
    assert sum(len(v) for v in subjects.values()) == 4
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
