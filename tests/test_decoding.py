"""Mental-state (trial) decoding and the few-subject protocol (Thomas, Ré & Poldrack 2022) on a
synthetic block design laid over the embedded HCP data.

The design: in every run, blocks of 20 TRs (14.4 s) of one of 4 classes, separated by 8 TRs of rest,
in a seeded random order. During a block the BOLD of 8 ROIs of the class (ROIs ``8c .. 8c+7``) rises
by ``shared`` standard deviations, plus a random subject-specific pattern over all ROIs scaled by
``own``, both delayed by the haemodynamic shift of HCP (4 TRs x 0.72 s = 2.88 s): TR ``i`` carries the
signal of the event covering ``i * 0.72 - 2.88`` s. The store's labels are written stimulus-locked
(``shift_s=0``) from events tables and shifted when read (``data.trial_labels.shift_s=2.88``).

- ``task=decoding`` reaches a validation accuracy >= 0.8 (chance 0.25; 0.97 when written) in 60 steps
  (shared 0.4, own 0.3; the second half of every run validates).
- The few-subject curve (shared 0.6, own 0.6: subject idiosyncrasies that more training subjects
  average out; each run cut in two pseudo-subjects: 14 subjects, 4 held out) of the pretrained model
  rises with 1, 3, 10 training subjects (0.39, 0.52, 0.63 when written; chance 0.25).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainfm.config import compose
from brainfm.data.stores.roi import ROIStore, write_roi_h5, write_trial_labels
from brainfm.data.trial_labels import (
    add_trial_labels_from_events,
    blocks,
    events_to_trial_labels,
    labelled_blocks,
    read_events,
    shift_labels,
    shift_trs,
)
from brainfm.errors import ConfigError, DataError

CLASSES = ["body", "faces", "places", "tools"]
TR, SHIFT = 0.72, 2.88
BLOCK, REST = 20, 8


def block_events(n_trs: int, seed: int) -> pd.DataFrame:
    """BIDS-like events of one run: 4-class blocks of BLOCK TRs, REST TRs apart, plus an impulse cue."""
    rng = np.random.default_rng(seed)
    rows, t = [{"onset": 1.0, "duration": 0.0, "trial_type": "cue"}], 4
    while t + BLOCK < n_trs - 4:
        rows.append({"onset": round(t * TR, 3), "duration": round(BLOCK * TR, 3), "trial_type": CLASSES[rng.integers(4)]})
        t += BLOCK + REST
    return pd.DataFrame(rows)


def synthetic_design(src, dst, shared: float, own: float, seed: int = 0, parts: int = 1):
    """The embedded HCP runs with the block design laid over them (module docstring); labels
    ``/trial_labels/task`` (stimulus-locked) and a per-run label ``/labels/half``. ``parts``: cut each
    run into that many pseudo-subjects (7 x parts subjects)."""
    store = ROIStore(src)
    rng = np.random.default_rng(seed)
    pattern = np.zeros((4, store.n_rois))
    for c in range(4):
        pattern[c, 8 * c: 8 * c + 8] = 1.0
    runs, events, subjects = [], {}, []
    for r in range(store.n_runs):
        for k, x in enumerate(np.array_split(store.read(r).T.astype(np.float64), parts, axis=1)):
            ev = block_events(x.shape[1], seed + len(runs))
            lab, _ = events_to_trial_labels(ev, x.shape[1], TR, SHIFT, CLASSES)
            pat = shared * pattern + own * rng.normal(size=pattern.shape)
            on = lab >= 0
            x[:, on] += x.std(1, keepdims=True) * pat[lab[on]].T
            events[len(runs)] = ev
            runs.append(x)
            subjects.append(f"{store.subject_ids[r]}{'' if parts == 1 else chr(97 + k)}")
    write_roi_h5(dst, {store.atlas: runs}, subjects, TR, {store.atlas: store.roi_names},
                 labels={"half": [b"a" if i % 2 else b"b" for i in range(len(runs))]})  # the writer takes bytes
    assert add_trial_labels_from_events(dst, events, name="task", shift_s=0.0) == CLASSES
    return dst


@pytest.fixture(scope="module")
def design(hcp_h5, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoding")
    return {"root": root, "train": synthetic_design(hcp_h5, root / "train.h5", shared=0.4, own=0.3),
            "curve": synthetic_design(hcp_h5, root / "curve.h5", shared=0.6, own=0.6, seed=1, parts=2)}


@pytest.fixture(scope="module")
def trained(design):
    """``task=decoding`` (GPT backbone, d_model 32, one layer) trained 60 steps on the design."""
    from brainfm import training as train

    root = design["root"]
    cfg = compose("train", [
        f"paths.output_dir={root}/outputs", f"paths.split_dir={root}/splits", f"data.path={design['train']}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv",
        "callbacks.progress_bar=null", "experiment=decoding", "task.num_classes=null", "data.trial_labels.shift_s=2.88",
        "data.split.kind=time", "model.d_model=32", "model.depth=1", "model.n_heads=2", "data.window.length=12",
        "data.window.eval_stride=4", "data.batch_size=32", "task.optimizer.lr=3e-3", "trainer.max_steps=60",
        "trainer.val_check_interval=60"])
    return cfg, train.run(cfg)


# -- per-TR labels -----------------------------------------------------------------------------------------
def test_haemodynamic_shift_puts_labels_at_the_expected_trs():
    # HCP: TR 0.72 s, shift 4 TRs = 2.88 s. An event at 3.6 s (TR 5) lasting 7.2 s (10 TRs) covers
    # i * 0.72 - 2.88 in [3.6, 10.8) s, i.e. TRs 9..18
    ev = {"onset": [3.6], "duration": [7.2], "trial_type": ["faces"]}
    lab, classes = events_to_trial_labels(ev, 30, TR, shift_s=2.88)
    assert classes == ["faces"] and np.flatnonzero(lab == 0).tolist() == list(range(9, 19))
    assert (lab[:9] == -1).all() and (lab[19:] == -1).all()
    unshifted, _ = events_to_trial_labels(ev, 30, TR, shift_s=0.0)
    assert np.flatnonzero(unshifted == 0).tolist() == list(range(5, 15))
    # delaying stored stimulus-locked labels by shift_trs(2.88 s) TRs gives the same labels
    assert shift_trs(2.88, 0.0, TR) == 4 and shift_trs(None, 0.0, TR) == 0 and shift_trs(2.88, 2.88, TR) == 0
    np.testing.assert_array_equal(shift_labels(unshifted, 4), lab)
    # MDTB: TR 1 s, shift 3 TRs = 3 s: an event at 2 s lasting 4 s labels TRs 5..8
    mdtb, _ = events_to_trial_labels(ev | {"onset": [2.0], "duration": [4.0]}, 12, 1.0, shift_s=3.0)
    assert np.flatnonzero(mdtb == 0).tolist() == [5, 6, 7, 8]


def test_events_tsv_to_labels(tmp_path):
    tsv = tmp_path / "sub-01_task-wm_events.tsv"
    tsv.write_text("onset\tduration\ttrial_type\n0.0\t2.0\tfix\n2.0\t4.0\t2bk\n4.0\t2.0\t0bk\n9.0\tn/a\tcue\n")
    ev = read_events(tsv)
    assert ev["duration"].tolist() == [2.0, 4.0, 2.0, 0.0]
    # TR 1 s, no shift; classes chosen (fix is dropped); the later onset wins where events overlap;
    # the zero-duration cue labels nothing
    lab, classes = events_to_trial_labels(ev, 10, 1.0, classes=["0bk", "2bk"])
    assert classes == ["0bk", "2bk"]
    assert lab.tolist() == [-1, -1, 1, 1, 0, 0, -1, -1, -1, -1]
    assert blocks(lab) == [(2, 4, 1), (4, 6, 0)]
    bad = tmp_path / "bad.tsv"
    bad.write_text("onset\ttrial_type\n0\ta\n")
    with pytest.raises(DataError, match=r"bad.tsv has no column\(s\) \['duration'\]"):
        read_events(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_events(tmp_path / "missing.tsv")


def test_trial_labels_in_the_store_and_windows_inside_blocks(small_h5):
    # small_h5: 4 runs of 200 TRs, TR 2 s
    labels = [np.r_[np.full(10, -1), np.full(30, 0), np.full(25, 1), np.full(135, -1)]] * 4
    write_trial_labels(small_h5, "task", labels, ["rest", "task"], shift_s=0.0)
    store = ROIStore(small_h5)
    assert store.trial_label_names == ["task"]
    assert store.trial_label_info("task") == {"classes": ["rest", "task"], "shift_s": 0.0}
    np.testing.assert_array_equal(store.trial_labels(0, "task"), labels[0])
    segs, seg_labels = labelled_blocks(store, "task", [(0, 0, 200)], span=20)
    assert segs == [(0, 10, 40), (0, 40, 65)] and seg_labels == [0, 1]
    # a 2-TR delay (4 s at TR 2 s) moves the blocks; a split boundary cuts them
    assert labelled_blocks(store, "task", [(0, 0, 50)], span=5, shift=2) == ([(0, 12, 42), (0, 42, 50)], [0, 1])
    with pytest.raises(DataError, match=r"no /trial_labels/other .*add_trial_labels_from_events"):
        store.trial_labels(0, "other")
    store.close()  # HDF5 refuses a writer while a reader of the same process holds the file
    with pytest.raises(DataError, match="outside"):
        write_trial_labels(small_h5, "bad", [np.full(200, 5)] * 4, ["a"])
    with pytest.raises(DataError, match="3 runs"):
        write_trial_labels(small_h5, "bad", labels[:3], ["a", "b"])

    from brainfm.data.datamodules.roi import ROIDataModule

    dm = ROIDataModule(name="toy", path=str(small_h5), window={"length": 20, "eval_stride": 5}, batch_size=4,
                       trial_labels={"name": "task", "shift_s": 4.0}, split={"kind": "time", "train_fraction": 0.5})
    dm.setup()
    assert dm.meta["trial_labels"]["classes"] == ["rest", "task"] and dm.trial_labels["shift_trs"] == 2
    ds = dm.dataset("train")
    # every window lies inside one block (straddling windows are skipped) and carries that block's label
    shifted = shift_labels(labels[0], 2)
    for i in range(len(ds)):
        _, start = ds.window(i)
        item = ds[i]
        assert (shifted[start:start + 20] == int(item["trial_label"])).all()
    # blocks 12-42 (class 0, 30 TRs) and 42-67 (class 1, 25 TRs) in each of 4 runs, stride 5: 3 + 2 windows
    assert len(ds) == 4 * (3 + 2)
    batch = next(iter(dm.train_dataloader()))
    assert batch["trial_label"].dtype == torch.long and batch["trial_label"].shape == (4,)
    with pytest.raises(ConfigError, match="unknown key"):
        ROIDataModule(name="toy", path=str(small_h5), trial_labels={"name": "task", "shift": 4.0})


# -- task=decoding ---------------------------------------------------------------------------------------
def test_decoding_learns_the_block_design(trained):
    """Validation accuracy >= 0.8 over the second half of every run, chance 0.25 (4 balanced-ish classes)."""
    _, metrics = trained
    assert metrics["val/acc"] >= 0.8 and metrics["val/balanced_acc"] >= 0.8
    assert metrics["val/n_windows"] > 100 and "train/acc" in metrics and "train/balanced_acc" in metrics


def test_predict_refuses_a_head_that_predicts_per_window(trained, tmp_path):
    """The task contract (``BrainfmTask.predicts == "window"``) decides, not the task's methods: brainfm-predict writes one
    row per subject, so a decoding head is refused with the commands that do take it."""
    from brainfm.cli import predict as predict_cli

    cfg, _ = trained
    run_dir = Path(cfg.paths.run_dir)
    with pytest.raises(ConfigError, match=r"DecodingTask predicts a label per window, not per subject.*brainfm-interpret"):
        predict_cli.run(compose("predict", [f"ckpt={run_dir}", f"out={tmp_path / 'p.csv'}"]))
    assert not (tmp_path / "p.csv").exists()


def test_decoding_init_from_and_freeze_backbone(trained):
    from brainfm.runs import load_checkpoint
    from brainfm.tasks.decoding import DecodingTask

    cfg, _ = trained
    ckpt = load_checkpoint(cfg.paths.run_dir)
    hp = ckpt["hyper_parameters"]
    task = DecodingTask(hp["model"], num_classes=4, freeze_backbone=True, head="bn_linear",
                        init_from=ckpt["_path"], data_meta=hp["data_meta"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for k, v in task.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert not any(p.requires_grad for p in task.model.parameters())
    assert all(p.requires_grad for p in task.head.parameters())
    with pytest.raises(ConfigError, match="trial labels have 4 classes"):
        DecodingTask(hp["model"], num_classes=20, data_meta=hp["data_meta"])
    with pytest.raises(ConfigError, match="needs trial labels"):
        DecodingTask(hp["model"], num_classes=None, data_meta={"tr": 0.72})


# -- protocol=few_subject ---------------------------------------------------------------------------------
def _evaluate(*overrides):
    from brainfm.cli import evaluate

    return evaluate.run(compose("evaluate", ["trainer.enable_progress_bar=false", *overrides]))


def test_few_subject_writes_a_rising_curve(trained, design, capsys):
    cfg, _ = trained
    out = design["root"] / "eval"
    report = _evaluate(f"ckpt={cfg.paths.run_dir}", f"data_path={design['curve']}", "protocol=few_subject",
                       "few_subject.n_train_subjects=[1,3,10]", "few_subject.repeats=3", f"out_dir={out}")
    assert report["protocol"]["haemodynamic_shift"] == {"stored_s": 0.0, "delay_trs": 4,
                                                        "total_s": pytest.approx(2.88)}  # the checkpoint's shift
    with open(out / "few_subject.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], int(r["n_train_subjects"])) for r in rows] == \
        [(m, n) for m in ("pretrained", "random_init") for n in (1, 3, 10)]
    acc = [float(r["acc_mean"]) for r in rows if r["method"] == "pretrained"]
    assert acc[0] < acc[1] < acc[2] and acc[2] > acc[0] + 0.15, acc  # chance 0.25; 0.39, 0.52, 0.63 when written
    assert json.loads((out / "few_subject.json").read_text())["protocol"]["n_test_subjects"] == 4
    assert (out / "few_subject.png").stat().st_size > 10_000
    assert "Few-subject decoding" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"sizes must lie in \[1, 5\]"):
        _evaluate(f"ckpt={cfg.paths.run_dir}", "protocol=few_subject", "few_subject.n_train_subjects=[1,48]",
                  f"out_dir={out}")


def test_few_subject_with_a_per_run_label(trained, design):
    cfg, _ = trained
    out = design["root"] / "eval_run"
    report = _evaluate(f"ckpt={cfg.paths.run_dir}", f"data_path={design['curve']}", "protocol=few_subject",
                       "few_subject.source=run", "few_subject.label=half", "few_subject.n_train_subjects=[2,4]",
                       "few_subject.repeats=2", "few_subject.baselines=[]", f"out_dir={out}")
    assert report["protocol"]["label"] == "/labels/half" and report["protocol"]["classes"] == ["a", "b"]
    with open(out / "few_subject.csv") as fh:
        assert [int(r["n_train_subjects"]) for r in csv.DictReader(fh)] == [2, 4]


def test_reidentification_stays_the_default_protocol():
    assert compose("evaluate", ["ckpt=x"]).protocol == "reidentification"
    with pytest.raises(ConfigError, match="protocol='lineup'"):
        _evaluate("ckpt=x", "protocol=lineup")
