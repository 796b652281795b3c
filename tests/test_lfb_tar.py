"""Thomas et al.'s WebDataset shards (``data=lfb_tar``): batches in the ROI datamodule's layout with each
sample's TR, the split of shards over ranks and workers, a mid-epoch resume at the same sample (at the
loader and through Lightning), and the converters tar -> ROI HDF5 -> tar.

Shards are written here in the exact LfB layout (``__key__``, ``bold.pyd`` float32 (T, n_rois), ``t_r.pyd``
float32; downstream ``task_label.pyd``, ``label_across_tasks.pyd``) with webdataset's ``ShardWriter``:
8 subjects x 2 runs, 16 ROIs (the model follows ``data.n_rois``), two TRs (0.72 s and 2 s).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import SimulatedCrash, train_losses
from lightning.pytorch.callbacks import Callback

from brainfm import training as train
from brainfm.data.datamodules.lfb_tar import (
    LfBLoader,
    LfBTarDataModule,
    shard_assignment,
)
from brainfm.data.stores.lfb_tar import (
    NO_LABEL,
    TRIAL_LABELS_TASK,
    read_shards,
    tar_to_h5,
)
from brainfm.data.stores.roi import ROIStore
from brainfm.errors import ConfigError, DataError

N_ROIS = 16


def write_lfb_shards(folder: Path, n_subjects: int = 8, runs: int = 2, per_shard: int = 2, downstream: bool = False,
                     trs: tuple[float, float] = (0.72, 2.0), seed: int = 0, prefix: str = "train",
                     first_subject: int = 0) -> list[Path]:
    """Shards as Thomas et al.'s dataprep writes them (``Preprocessor.write_bold_to_tar``): keys
    ``ds-toy_sub-<id>_task-rest_run-<r>`` (downstream: ``..._sample_<NNN>`` with labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for s in range(first_subject, first_subject + n_subjects):
            for r in range(1, runs + 1):
                n = int(rng.integers(60, 90))
                bold = (rng.normal(size=(n, N_ROIS)) * rng.uniform(0.5, 3, size=N_ROIS) + rng.normal(size=N_ROIS) * 10)
                key = f"ds-toy_sub-{s:02d}_task-rest_run-{r}"
                sample = {"__key__": key, "bold.pyd": bold.astype(np.float32), "t_r.pyd": np.float32(trs[s % 2])}
                if downstream:
                    sample["__key__"] = f"{key}_sample_{r:03d}"
                    sample["task_label.pyd"] = int((s + r) % 3)
                    sample["label_across_tasks.pyd"] = int((s * 2 + r) % 5)
                sink.write(sample)
    return sorted(folder.glob(f"{prefix}-*.tar"))


@pytest.fixture
def shards(tmp_path) -> Path:
    write_lfb_shards(tmp_path / "up")
    return tmp_path / "up"


def _dm(tmp_path, path, **kw) -> LfBTarDataModule:
    args = {"name": "lfb_toy", "path": str(path), "n_rois": N_ROIS, "split_dir": str(tmp_path / "splits"),
            "window": {"length": 24, "min_length": 12}, "batch_size": 4, "eval_batch_size": 8, "seed": 3,
            "shuffle_buffer": 4}
    args.update(kw)
    dm = LfBTarDataModule(**args)
    dm.setup("fit")
    return dm


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


def test_batches_have_roi_layout_tr_per_sample_and_run_zscore(tmp_path, shards):
    dm = _dm(tmp_path, f"{shards}/*.tar", split={"fractions": [0.75, 0.25, 0.0]}, windows_per_run=2)
    raw = {s["__key__"]: s for s in read_shards(f"{shards}/train-{{000000..000007}}.tar")}
    assert len(raw) == 16 and len(dm.store) == 16 and dm.store.n_rois == N_ROIS
    assert dm.tr == "mixed" and dm.meta["n_rois"] == N_ROIS
    loader = dm.train_dataloader()
    train_runs = {r for r, _, _ in dm.segments["train"]}
    assert len(loader) == 12 * 2 // 4  # 12 training runs x 2 windows / batch 4
    batches = list(loader)
    assert len(batches) == len(loader)
    lengths = set()
    for batch in batches:
        assert set(batch) == {"bold", "t", "onset", "subject", "run", "window"}
        B, L, R = batch["bold"].shape
        lengths.add(L)
        assert (B, R) == (4, N_ROIS) and 12 <= L <= 24 and batch["bold"].dtype == torch.float32
        assert batch["t"].shape == (B, L) and batch["t"].dtype == torch.float32
        for key in ("subject", "run", "window"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (B,)
        for i in range(B):
            run = int(batch["run"][i])
            assert run in train_runs
            key, tr = dm.store.keys[run], float(dm.store.trs[run])
            assert tr in (pytest.approx(0.72), 2.0)
            torch.testing.assert_close(batch["t"][i], torch.arange(L, dtype=torch.float32) * tr)
            start = round(float(batch["onset"][i]) / tr)
            expect = _zscore(raw[key]["bold"])[start:start + L]
            np.testing.assert_allclose(batch["bold"][i].numpy(), expect, rtol=1e-4, atol=1e-4)
            assert dm.store.subjects()[int(batch["subject"][i])] == dm.store.subject_ids[run]
    assert len(lengths) > 1  # one random crop length per batch
    # every training window of the epoch once: 12 runs x windows 0, 1
    seen = sorted((int(r), int(w)) for b in batches for r, w in zip(b["run"], b["window"]))
    assert seen == sorted((r, w) for r in train_runs for w in (0, 1))
    # evaluation: the fixed grid of the validation runs, same layout
    val = list(dm.val_dataloader())
    val_runs = {r for r, _, _ in dm.segments["val"]}
    assert {int(r) for b in val for r in b["run"]} == val_runs
    assert all(b["bold"].shape[1:] == (24, N_ROIS) for b in val)
    again = list(dm.val_dataloader())  # the same fixed grid every time
    assert len(again) == len(val) and all(torch.equal(a["bold"], b["bold"]) for a, b in zip(val, again))


def test_downstream_shards_carry_trial_label(tmp_path):
    folder = tmp_path / "down"
    write_lfb_shards(folder, downstream=True)
    dm = _dm(tmp_path, f"{folder}/*.tar", split={"fractions": [0.75, 0.25, 0.0]})
    raw = {s["__key__"]: s for s in read_shards(f"{folder}/*.tar")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["trial_label"].dtype == torch.int64 and batch["trial_label"].shape == (4,)
    want = [raw[dm.store.keys[int(r)]]["task_label"] for r in batch["run"]]
    assert batch["trial_label"].tolist() == want


def test_shards_split_over_ranks_and_workers(tmp_path, shards):
    """2 ranks x 2 workers: each stream reads its own shards, together all of them, each run once per epoch."""
    val = tmp_path / "val"
    write_lfb_shards(val, n_subjects=2, prefix="val", seed=1, first_subject=8)
    dm = _dm(tmp_path, f"{shards}/*.tar", val_path=f"{val}/*.tar", split={"kind": "files"},
             window={"length": 24, "min_length": None}, batch_size=2)
    assert len(dm.segments["train"]) == 16 and len(dm.segments["val"]) == 4
    n_shards = 8
    for epoch in (0, 1):
        streams = {}
        for rank in range(2):
            stream = dm.stream("train", rank_world=(rank, 2))
            loader = LfBLoader(stream, position=lambda e=epoch: (e, 0), num_workers=2)
            batches = list(loader)
            assert len(batches) == len(loader) == 4  # 16 runs / 4 streams / batch 2, x 2 workers
            for i, b in enumerate(batches):  # the DataLoader's round robin: batch i from worker i % 2
                streams.setdefault((rank, i % 2), set()).update(int(dm.store.shard_of[r]) for r in b["run"])
            runs = [int(r) for b in batches for r in b["run"]]
            assert len(runs) == len(set(runs)) == 8
        for (rank, worker), found in streams.items():
            assert found == set(shard_assignment(n_shards, epoch, dm.seed, rank, 2, worker, 2))
            assert len(found) == 2
        assert set().union(*streams.values()) == set(range(n_shards))
        assert sum(len(s) for s in streams.values()) == n_shards  # disjoint
    order0 = [shard_assignment(n_shards, 0, 3, r, 2, w, 2) for r in range(2) for w in range(2)]
    order1 = [shard_assignment(n_shards, 1, 3, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert order0 != order1  # reshuffled per epoch, seeded
    assert order0 == [shard_assignment(n_shards, 0, 3, r, 2, w, 2) for r in range(2) for w in range(2)]


def test_subject_in_train_and_val_shards_is_refused(tmp_path, shards):
    val = tmp_path / "val"
    write_lfb_shards(val, n_subjects=2, prefix="val", seed=1, downstream=True)  # other keys, same subjects
    with pytest.raises(DataError, match="both data.path and data.val_path"):
        _dm(tmp_path, f"{shards}/*.tar", val_path=f"{val}/*.tar", split={"kind": "files"})


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_continues_at_the_same_batch(tmp_path, shards, workers):
    dm = _dm(tmp_path, f"{shards}/*.tar", split={"fractions": [1.0, 0.0, 0.0]}, windows_per_run=3, num_workers=workers,
             batch_size=3)
    full = list(LfBLoader(dm.stream("train"), position=lambda: (1, 0), num_workers=workers))
    assert len(full) == 16
    for skip in (3, 8):
        rest = list(LfBLoader(dm.stream("train"), position=lambda s=skip: (1, s), num_workers=workers))
        assert len(rest) == len(full) - skip
        for a, b in zip(full[skip:], rest):
            assert a["run"].tolist() == b["run"].tolist()
            torch.testing.assert_close(a["bold"], b["bold"], rtol=0, atol=0)
            torch.testing.assert_close(a["t"], b["t"], rtol=0, atol=0)
    other = list(LfBLoader(dm.stream("train"), position=lambda: (2, 0), num_workers=workers))
    assert [b["run"].tolist() for b in other] != [b["run"].tolist() for b in full]


# -- Lightning: train and resume mid-epoch ----------------------------------------------------------------------
STEPS = ("trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=0",
         "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "trainer.log_every_n_steps=1")
GPT = ("experiment=gpt", "model.d_model=32", "model.depth=2", "model.dropout=0", "model.attn_dropout=0",
       "data=lfb_tar", f"data.n_rois={N_ROIS}", "data.window.length=24", "data.window.min_length=12",
       "data.batch_size=4", "data.windows_per_run=2", "data.split.fractions=[0.75,0.25,0.0]", "data.shuffle_buffer=4")


def test_gpt_trains_on_tar_shards_and_resumes_mid_epoch(cfg_for, shards):
    common = (*GPT, f"data.path={shards}/*.tar", *STEPS)
    cfg = cfg_for(*common, "run_name=full")
    train.run(cfg)
    full = train_losses(Path(cfg.paths.run_dir))
    assert sorted(full) == list(range(1, 21)) and all(np.isfinite(v) for v in full.values())
    # 12 training runs x 2 windows / batch 4 = 6 batches per epoch: the checkpoint at step 10 is mid-epoch 1
    part = cfg_for(*common, "run_name=crash", "+callbacks.crash._target_=helpers.CrashAtStep", "+callbacks.crash.step=13")
    with pytest.raises(SimulatedCrash):
        train.run(part)
    resumed_cfg = cfg_for(*common, "run_name=crash", "ckpt_path=last")
    train.run(resumed_cfg)
    state = torch.load(Path(resumed_cfg.paths.run_dir) / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert state["LfBTarDataModule"]["train_epoch"] == 3
    resumed = train_losses(Path(resumed_cfg.paths.run_dir))
    steps = list(range(11, 21))  # after the step-10 checkpoint
    assert all(s in resumed for s in steps)
    np.testing.assert_allclose([resumed[s] for s in steps], [full[s] for s in steps], rtol=1e-6, atol=0)


# -- converters ---------------------------------------------------------------------------------------------------
def _same_samples(a: list[dict], b: list[dict]) -> None:
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
    for x, y in zip(a, b):
        assert set(x) == set(y)
        np.testing.assert_array_equal(x["bold"], y["bold"])
        assert x["bold"].dtype == y["bold"].dtype == np.float32
        assert np.float32(x["t_r"]) == np.float32(y["t_r"])
        for k in set(x) - {"__key__", "bold", "t_r"}:
            assert x[k] == y[k], k


@pytest.mark.parametrize("downstream", [False, True])
def test_round_trip_tar_h5_tar(tmp_path, downstream):
    from brainfm.cli.data import main

    folder = tmp_path / "in"
    write_lfb_shards(folder, downstream=downstream, trs=(0.72, 0.72))
    pattern = f"{folder}/train-{{000000..000007}}.tar"
    main(["tar-to-h5", pattern, str(tmp_path / "lfb.h5"), "--shift-s", "2.88"])
    store = ROIStore(tmp_path / "lfb.h5")
    original = read_shards(pattern)
    assert store.n_runs == 16 and store.n_rois == N_ROIS and store.tr == pytest.approx(0.72)
    assert store.run_ids == [s["__key__"] for s in original]
    assert store.subject_ids[:2] == ["00", "00"] and store.has_run_stats
    np.testing.assert_array_equal(store.read(3), original[3]["bold"])
    with h5py.File(tmp_path / "lfb.h5") as f:
        assert (TRIAL_LABELS_TASK in f) == downstream
        if downstream:
            labels = f[TRIAL_LABELS_TASK][:]
            assert labels.dtype == np.int64 and labels.shape == (16, store.n_timepoints)
            for i, s in enumerate(original):
                n = len(s["bold"])
                assert (labels[i, :n] == s["task_label"]).all() and (labels[i, n:] == NO_LABEL).all()
            assert f["labels/label_across_tasks"][:].tolist() == [s["label_across_tasks"] for s in original]
            assert list(store.trial_label_info("task")["classes"]) == ["0", "1", "2"]
            assert store.trial_label_info("task")["shift_s"] == pytest.approx(2.88)
    main(["h5-to-tar", str(tmp_path / "lfb.h5"), str(tmp_path / "out"), "--shard-size", "5"])
    written = sorted((tmp_path / "out").glob("*.tar"))
    assert len(written) == 4  # 16 samples, 5 per shard
    _same_samples(original, read_shards(f"{tmp_path}/out/*.tar"))
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_converters_refuse_bad_input_and_leave_nothing(tmp_path, shards):
    with pytest.raises(DataError, match="one TR"):
        tar_to_h5(f"{shards}/*.tar", tmp_path / "mixed.h5")  # 0.72 s and 2 s samples
    assert not list(tmp_path.glob("*mixed.h5*"))
    with pytest.raises(DataError, match="no shard"):
        tar_to_h5(f"{tmp_path}/nothing-{{0..3}}.tar", tmp_path / "x.h5")
    one = tmp_path / "one"
    write_lfb_shards(one, trs=(2.0, 2.0))
    tar_to_h5(f"{one}/*.tar", tmp_path / "one.h5")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    from brainfm.data.stores.lfb_tar import h5_to_tar

    with pytest.raises(DataError, match="not an empty folder"):
        h5_to_tar(tmp_path / "one.h5", tmp_path / "busy")
    shard = sorted(one.glob("*.tar"))[3]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated shard
    with pytest.raises(DataError, match=f"{shard.name}.*(damaged|truncated)"):
        tar_to_h5(f"{one}/*.tar", tmp_path / "trunc.h5")
    assert not list(tmp_path.glob("*trunc.h5*"))
    with pytest.raises(DataError, match=f"{shard.name}: damaged tar"):
        _dm(tmp_path, f"{one}/*.tar")


def test_config_errors(tmp_path, shards):
    with pytest.raises(ConfigError, match="ROI count mismatch"):
        _dm(tmp_path, f"{shards}/*.tar", n_rois=1024)
    with pytest.raises(ConfigError, match="time"):
        _dm(tmp_path, f"{shards}/*.tar", split={"kind": "time"})
    with pytest.raises(ConfigError, match="TR mismatch"):
        _dm(tmp_path, f"{shards}/*.tar", tr=0.72)
    dm = _dm(tmp_path, f"{shards}/*.tar", num_workers=16)
    with pytest.raises(ConfigError, match="shard"):
        dm.train_dataloader()


def test_h5_task_run_with_trial_labels_becomes_trial_samples(tmp_path, small_h5):
    """A run whose trial_labels/task change over time becomes one LfB downstream sample per stretch of one
    label (``<run_id>_sample_<NNN>``), its TRs and label exact; unlabelled TRs (-1) are left out."""
    from brainfm.data.stores.lfb_tar import h5_to_tar

    store = ROIStore(small_h5)
    labels = np.full((store.n_runs, store.n_timepoints), NO_LABEL, dtype=np.int64)
    labels[1, 10:30], labels[1, 30:45], labels[1, 60:80] = 2, 0, 2
    with h5py.File(small_h5, "a") as f:
        f.create_dataset(TRIAL_LABELS_TASK, data=labels)
    h5_to_tar(small_h5, tmp_path / "trials", shard_size=4)
    samples = read_shards(f"{tmp_path}/trials/*.tar")
    keys = [s["__key__"] for s in samples]
    assert keys == ["sub-00_run0", "sub-01_run1_sample_001", "sub-01_run1_sample_002", "sub-01_run1_sample_003",
                    "sub-02_run2", "sub-03_run3"]
    for sample, (a, b, label) in zip(samples[1:4], [(10, 30, 2), (30, 45, 0), (60, 80, 2)]):
        np.testing.assert_array_equal(sample["bold"], store.read(1)[a:b])
        assert sample["task_label"] == label and sample["t_r"] == pytest.approx(2.0)
    assert "task_label" not in samples[0]


class RecordRuns(Callback):
    """Write the ``run`` of every training batch of this rank to ``<run_dir>/runs_rank<r>.json`` (used by the
    2-rank test below, in its ``brainfm-train`` subprocess)."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.runs.append([int(r) for r in batch["run"]])

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        out = Path(trainer.default_root_dir) / f"runs_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"epoch_batches": int(trainer.num_training_batches), "runs": self.runs}))


@pytest.mark.slow
def test_two_cpu_ranks_with_two_workers_read_disjoint_shards(shards, tmp_path):
    """``trainer=ddp_cpu`` (2 gloo ranks) x 2 DataLoader workers: each epoch the ranks see disjoint runs that
    together are every training run once (each rank reads its own shards)."""
    import json
    import subprocess
    import sys

    import helpers

    out = subprocess.run(
        [sys.executable, "-m", "brainfm.cli.train", *GPT, "trainer=ddp_cpu", f"data.path={shards}/*.tar",
         "data.num_workers=2", "data.batch_size=2", "data.windows_per_run=1", "data.split.fractions=[1.0,0.0,0.0]",
         "data.window.min_length=null", f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits",
         "trainer.max_steps=8", "trainer.limit_val_batches=0", "callbacks.model_checkpoint=null", "logger=csv",
         "run_name=ddp", "+callbacks.record._target_=test_lfb_tar.RecordRuns"],
        env=helpers.subprocess_env(), capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-5000:]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "outputs").rglob("runs_rank*.json"))]
    assert len(ranks) == 2 and all(r["epoch_batches"] == 4 for r in ranks)  # 16 runs / 2 ranks / batch 2
    for epoch in range(2):
        seen = [[run for b in r["runs"][epoch * 4:(epoch + 1) * 4] for run in b] for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(16))


def test_paper_size_preset_composes_with_tar_shards(cfg_for, shards):
    """``experiment=lfb_gpt data=lfb_tar``: the paper's GPT on the shards (ROI count from the data)."""
    from hydra.utils import instantiate

    cfg = cfg_for("experiment=lfb_gpt", "data=lfb_tar", f"data.path={shards}/*.tar", "data.n_rois=null",
                  "data.split.fractions=[0.75,0.25,0.0]")
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert dm.meta["n_rois"] == N_ROIS and dm.meta["tr"] == "mixed" and dm.meta["window_length"] == 50
    assert sum(len(v) for v in dm.subject_split.values()) == 8
