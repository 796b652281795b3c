"""Brainmarks data in and out: ``brainfm-data to-brainmarks`` writes an ROI store as Brainmarks' Hugging Face Arrow
layout, ``data=brainmarks`` reads it (values, subjects, TR, labels, the split as given) and trains; Brainmarks'
own loader reads what brainfm wrote (docs/brainmarks_data.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from brainfm.cli import data as data_cli
from brainfm.config import compose
from brainfm.data.atlases import BRAINMARKS_SPACES, brainmarks_space
from brainfm.data.splits import draw_subject_split
from brainfm.data.stores.roi import ROIStore
from brainfm.errors import ConfigError, DataError
from helpers import require_brainmarks

pytest.importorskip("datasets")

SEX = {"101309": "M", "102311": "F", "102816": "F", "131217": "M", "211619": "M", "213522": "F", "377451": "M"}


def _overrides(tmp_path: Path, arrow: Path, *extra: str) -> list[str]:
    return [f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits", "data=brainmarks",
            f"data.path={arrow}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "logger=csv", *extra]


def _datamodule(tmp_path: Path, arrow: Path, *extra: str):
    dm = instantiate(compose("train", _overrides(tmp_path, arrow, *extra)).data, _convert_="all")
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def labelled_h5(hcp_h5, tmp_path_factory) -> Path:
    """The embedded HCP store with synthetic per-run labels: ``sex`` (F/M) and ``age`` (float)."""
    path = tmp_path_factory.mktemp("bm_store") / "hcp_rest_roi.h5"
    shutil.copy(hcp_h5, path)
    with h5py.File(path, "a") as f:
        subjects = [s.decode() for s in f["long_subject_id"][:]]
        f.create_dataset("labels/sex", data=np.array([SEX[s] for s in subjects], dtype=h5py.string_dtype()))
        f.create_dataset("labels/age", data=np.arange(len(subjects), dtype=np.float64) * 1.5 + 22.0)
    return path


@pytest.fixture(scope="module")
def arrow32(labelled_h5, tmp_path_factory) -> Path:
    """``to-brainmarks`` of the labelled store, bold in float32 (exact round trip)."""
    out = tmp_path_factory.mktemp("bm_out32") / "hcp_rest_roi.aal2.arrow"
    data_cli.main(["to-brainmarks", str(labelled_h5), str(out), "--dtype", "float32"])
    return out


@pytest.fixture(scope="module")
def arrow16(labelled_h5, tmp_path_factory) -> Path:
    """``to-brainmarks`` with the defaults (float16, as Brainmarks' own data sets), into a root folder."""
    root = tmp_path_factory.mktemp("bm_out16")
    data_cli.main(["to-brainmarks", str(labelled_h5), str(root), "--name", "hcp-rest"])
    return root / "hcp-rest.aal2.arrow"


def test_layout_and_split_are_brainmarks_and_seeded(arrow16, labelled_h5):
    assert sorted(p.name for p in arrow16.iterdir()) == ["dataset_dict.json", "test", "train", "validation"]
    assert not [p for p in arrow16.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    from brainfm.data.stores.brainmarks import BrainmarksStore

    store = BrainmarksStore(arrow16)
    expected = draw_subject_split(ROIStore(labelled_h5).subject_ids, (0.8, 0.1, 0.1), 0)  # data.split.kind=subject's
    got = {k: sorted({store.subject_ids[r] for r in runs}) for k, runs in store.split_runs().items()}
    assert got == expected and all(got.values())
    assert (store.space, store.n_rois, store.tr) == ("aal2", 94, 0.72)
    assert {"sex", "age", "run", "n_frames"} <= set(store.run_label_names)


def test_data_brainmarks_round_trips_values_subjects_tr_and_labels(arrow32, labelled_h5, tmp_path):
    dm = _datamodule(tmp_path, arrow32, "+data.labels.columns.sex=sex", "+data.labels.columns.age=age")
    original = ROIStore(labelled_h5, preload=False)
    from brainfm.data.normalization import ROINormalizer

    norm = ROINormalizer.fit(original, "run")
    store = dm.store
    assert sorted(store.subject_ids) == sorted(original.subject_ids)
    assert dm.tr == 0.72 and dm.meta["tr"] == 0.72 and dm.meta["n_rois"] == 94 and dm.meta["space"] == "aal2"
    for run in range(len(store)):
        row = original.subject_ids.index(store.subject_ids[run])
        assert store.lengths[run] == original.lengths[row]
        x = dm.normalizer.apply(run, store.read(run))  # data.normalization.mode=run: Brainmarks' bold as stored
        y = norm.apply(row, original.read(row))
        np.testing.assert_allclose(x, y, atol=1e-4)  # float32 of bold * std + mean at means ~1e4
        np.testing.assert_allclose(store.read(run), original.read(row), rtol=1e-5, atol=1e-3)  # bold * std + mean
    # the split is Brainmarks' (whole samples), never re-drawn
    for split, runs in store.split_runs().items():
        assert dm.segments[split] == [(r, 0, int(store.lengths[r])) for r in runs]
    assert dm.split_file is None
    # labels: by subject, classes sorted (F, M), numbers as floats
    subjects = store.subjects()
    assert dm.labels.values["sex"].tolist() == [["F", "M"].index(SEX[s]) for s in subjects]
    ages = dict(zip(original.subject_ids, original.run_labels("age")))
    np.testing.assert_allclose(dm.labels.values["age"].numpy(), [ages[s] for s in subjects])
    batch = next(iter(dm.val_dataloader()))
    batch = dm.on_before_batch_transfer(batch, 0)
    assert batch["bold"].shape[1:] == (60, 94) and batch["sex"].dtype == torch.long


def test_float16_data_set_reads_within_half_precision(arrow16, labelled_h5, tmp_path):
    dm = _datamodule(tmp_path, arrow16)
    original = ROIStore(labelled_h5, preload=False)
    from brainfm.data.normalization import ROINormalizer

    norm = ROINormalizer.fit(original, "run")
    run = 0
    row = original.subject_ids.index(dm.store.subject_ids[run])
    x, y = dm.normalizer.apply(run, dm.store.read(run)), norm.apply(row, original.read(row))
    np.testing.assert_allclose(x, y, atol=5e-3)


def test_trains_20_steps_on_brainmarks_data(arrow16, tmp_path):
    from brainfm import training as train

    cfg = compose("train", _overrides(
        tmp_path, arrow16, "experiment=gpt", "task=supervised", "task.target=sex", "task.kind=binary",
        "+data.labels.columns.sex=sex", "model.d_model=32", "model.depth=1", "data.window.length=40",
        "data.window.min_length=null", "trainer.max_steps=20", "trainer.val_check_interval=20",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=5"))
    metrics = train.run(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())["global_step"] == 20
    meta = torch.load(Path(cfg.paths.run_dir) / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["data_meta"]
    assert meta["layout"] == "brainmarks" and meta["tr"] == pytest.approx(0.72) and meta["n_rois"] == 94


def test_brainmarks_own_loader_reads_what_to_brainmarks_wrote(arrow16, tmp_path):
    require_brainmarks("brainmarks.datasets.base")
    from brainmarks.datasets.base import HFDataset, load_arrow_dataset
    from brainmarks.readers import DATA_DIMS

    assert DATA_DIMS == BRAINMARKS_SPACES
    n = 0
    for split in ("train", "validation", "test"):
        ds = HFDataset(load_arrow_dataset(arrow16 / split, cache_dir=tmp_path / "hf"), target_key="sex")
        assert set(ds.labels.tolist()) <= {"F", "M"}
        sample = ds[0]
        assert sample["bold"].shape == (1200, 94)  # stored float16; Brainmarks' torch format gives float32
        assert sample["mean"].shape == (1, 94) and sample["std"].shape == (1, 94)
        assert float(sample["tr"]) == pytest.approx(0.72)
        assert sample["target"] in (0, 1) and isinstance(sample["sub"], str)
        z = sample["bold"].float()
        torch.testing.assert_close(z.mean(0), torch.zeros(94), atol=2e-3, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(94), atol=2e-3, rtol=0)
        n += len(ds)
    assert n == 7


def _write_foreign(path: Path, trs=(0.8, 0.8), by_sample: bool = False) -> Path:
    """A small data set written as MedARC's scripts do (Array2D float16 bold, float32 mean/std/tr, string sub,
    an int target), one split per list entry; ``trs``: the TR of the train samples."""
    import datasets as hf

    rng = np.random.default_rng(0)
    features = hf.Features({"sub": hf.Value("string"), "gender": hf.Value("string"), "age_q": hf.Value("int32"),
                            "cond": hf.Value("int32"), "tr": hf.Value("float32"), "bold": hf.Array2D(shape=(None, 400), dtype="float16"),
                            "mean": hf.Array2D(shape=(1, 400), dtype="float32"),
                            "std": hf.Array2D(shape=(1, 400), dtype="float32")})
    subs = {"train": ["s1", "s2"], "validation": ["s1" if by_sample else "s3"], "test": ["s4"]}
    parts = {}
    for split, names in subs.items():
        rows = []
        for i, s in enumerate(names):
            x = rng.normal(size=(50, 400))
            z = (x - x.mean(0)) / x.std(0)
            z[:, 7] = 0.0  # a parcel constant over the sample: Brainmarks stores 0 with mean 0, std 0
            std = np.ones((1, 400), np.float32) * 2
            std[0, 7] = 0
            rows.append({"sub": s, "gender": "F" if s in ("s1", "s3") else "M", "age_q": int(s[1]) % 3, "cond": len(parts) * 10 + i,
                         "tr": trs[i] if split == "train" else trs[0], "bold": z.astype(np.float16),
                         "mean": np.full((1, 400), 5.0, np.float32) * (std > 0), "std": std})
        parts[split] = hf.Dataset.from_list(rows, features=features)
    hf.disable_progress_bars()
    hf.DatasetDict(parts).save_to_disk(str(path))
    return path


def test_reads_a_data_set_written_as_brainmarks_does(tmp_path):
    arrow = _write_foreign(tmp_path / "toy.schaefer400.arrow")
    dm = _datamodule(tmp_path, arrow, "+data.labels.columns.sex=gender", "data.window.length=20")
    assert (dm.store.space, dm.store.n_rois, dm.tr, len(dm.store)) == ("schaefer400", 400, 0.8, 4)
    assert dm.meta["atlas"] == "schaefer400"
    z = dm.normalizer.apply(0, dm.store.read(0))
    assert np.all(z[:, 7] == 0) and abs(float(z[:, 0].std()) - 1) < 1e-2  # the constant parcel stays 0
    assert dm.labels.values["sex"].tolist() == [0, 1, 0, 1]  # s1 s2 s3 s4: F M F M, classes sorted [F, M]
    assert brainmarks_space(dm.meta["atlas"], 400) == "schaefer400"


def test_mixed_trs_are_refused_with_the_fix_or_resampled(tmp_path):
    arrow = _write_foreign(tmp_path / "mixed.schaefer400.arrow", trs=(0.8, 2.0))
    with pytest.raises(ConfigError, match=r"data.resample_tr=<s>"):
        _datamodule(tmp_path, arrow, "data.window.length=10")
    dm = _datamodule(tmp_path, arrow, "data.resample_tr=0.8", "data.window.length=10")
    assert dm.tr == 0.8 and dm.store.lengths.tolist() == [50, 125, 50, 50]


def test_a_subject_in_two_splits_is_used_as_given(tmp_path, caplog):
    arrow = _write_foreign(tmp_path / "bysample.schaefer400.arrow", by_sample=True)
    dm = _datamodule(tmp_path, arrow, "data.window.length=10")
    assert "more than one of Brainmarks' splits" in caplog.text
    assert dm.subject_split["train"] == ["s1", "s2"] and dm.subject_split["val"] == ["s1"]


def test_a_label_that_varies_within_a_subject_is_refused(tmp_path):
    arrow = _write_foreign(tmp_path / "vary.schaefer400.arrow", by_sample=True)
    dm = _datamodule(tmp_path, arrow, "data.window.length=10", "+data.labels.columns.age=age_q")
    assert dm.labels.values["age"].tolist() == [0, 1, 0]  # s1, s2, s4: age_q 1, 2, 1; integers are classes
    assert dm.store.run_labels("cond").tolist() == [0, 1, 10, 20]  # per sample, for callbacks.probe.label=cond
    with pytest.raises(DataError, match=r"'cond' differs between the samples of subject s1.*probe.label=cond"):
        _datamodule(tmp_path, arrow, "data.window.length=10", "+data.labels.columns.c=cond")


def test_missing_path_and_missing_splits_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data.path=<root>/<name>.<space>.arrow"):
        _datamodule(tmp_path, tmp_path / "nothing.schaefer400.arrow")
    (tmp_path / "half.a424.arrow" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no split folder\(s\) \['validation', 'test'\]"):
        _datamodule(tmp_path, tmp_path / "half.a424.arrow")


def test_to_brainmarks_refuses_to_overwrite_and_leaves_nothing_on_failure(arrow32, labelled_h5, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"already exists.*rm -r"):
        from brainfm.data.stores.brainmarks_writer import write_brainmarks

        write_brainmarks(labelled_h5, arrow32)
    with pytest.raises(SystemExit) as info:  # the command: one line, exit status 2
        data_cli.main(["to-brainmarks", str(labelled_h5), str(arrow32)])
    assert info.value.code == 2
    # a failure while writing: nothing at the output, no temporary folder
    import brainfm.data.stores.brainmarks_writer as bm

    def broken(*args, **kwargs):
        yield from []
        raise RuntimeError("disk full")

    monkeypatch.setattr(bm, "_rows", broken)
    out = tmp_path / "broken" / "x.aal2.arrow"
    with pytest.raises(Exception, match="generating the dataset|disk full"):
        bm.write_brainmarks(labelled_h5, out)
    assert list((tmp_path / "broken").iterdir()) == []


def test_spaces_and_output_names(labelled_h5, tmp_path):
    from brainfm.data.stores.brainmarks_writer import output_path

    assert brainmarks_space("schaefer400+tian3+buckner7", 457) == "schaefer400_tians3_buckner7"
    assert brainmarks_space("schaefer400+tian3", 450) == "schaefer400_tians3"
    assert brainmarks_space("A424", 424) == "a424" and brainmarks_space("aal2", 94) is None
    assert brainmarks_space("schaefer400", 100) is None
    assert output_path(tmp_path, "schaefer400", 400, "ukb") == (tmp_path / "ukb.schaefer400.arrow", "schaefer400")
    assert output_path(tmp_path / "d.x.arrow", "aal2", 94, "ukb") == (tmp_path / "d.x.arrow", "x")
    with pytest.raises(DataError, match=r"<name>.<space>.arrow"):
        output_path(tmp_path / "plain.arrow", "aal2", 94, "ukb")
    with pytest.raises(DataError, match=r"400 dimensions.*--space"):
        output_path(tmp_path, "aal2", 94, "ukb", space="schaefer400")
    with pytest.raises(DataError, match="leaves split"):
        from brainfm.data.stores.brainmarks_writer import write_brainmarks

        write_brainmarks(labelled_h5, tmp_path / "e.aal2.arrow", fractions=(1.0, 0.0, 0.0))
    assert not (tmp_path / "e.aal2.arrow").exists()


def test_store_interface_pickles_and_reads_with_stride_and_out(arrow32, tmp_path):
    import pickle

    from brainfm.data.stores import Store, detect_kind, open_store

    assert detect_kind(arrow32) == "brainmarks"
    store = open_store("brainmarks", arrow32)
    assert isinstance(store, Store) and store.kind == "roi" and store.frame_shape == (94,)
    full = store.read(2)
    out = np.empty((5, 94), dtype=np.float32)
    np.testing.assert_array_equal(store.read(2, 10, 20, stride=2, out=out), full[10:20:2])
    again = pickle.loads(pickle.dumps(store))  # DataLoader workers: the memory maps are reopened
    np.testing.assert_array_equal(again.read_clip(2, 3, 4), full[3:7])
    with pytest.raises(IndexError):
        store.read(2, 0, 1201)
