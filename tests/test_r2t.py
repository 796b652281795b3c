"""R2T-Net: NT-Xent against a hand computation, rest/task pairing by subject, the three input kinds,
augmentations, the grayordinate store, training, the experiment preset, signatures and checkpoints."""

from __future__ import annotations

import csv
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from brainfm.data.stores.grayordinate import GrayordinateStore, read_dtseries, write_grayordinate_run
from brainfm.data.datamodules.r2t import R2TDataModule
from brainfm.data.datasets.pairs import assign_roles
from fixtures_r2t import (
    subject_ids,
    write_dtseries,
    write_grayordinate_pairs,
    write_labels,
    write_roi_pairs,
    write_volume_pairs,
)

from brainfm.config import compose
from brainfm.data.stores.roi import ROIStore
from brainfm.errors import ConfigError, DataError
from brainfm.tasks.losses import nt_xent
from brainfm.tasks.r2t import R2TTask, predict_subjects, write_prediction_csv

TMLP = dict(_target_="brainfm.models.r2t_encoders.TemporalMLPEncoder", n_rois=12, d_model=32, depth=1)
SEQ = dict(_target_="brainfm.models.sequence.SequenceTransformer", n_rois=12, d_model=32, depth=1, n_heads=2)
SWIN = dict(_target_="brainfm.models.swin4d.SwinTransformer4D", img_size=[8, 8, 8, 4], embed_dim=12, depths=[1, 1],
            num_heads=[2, 2], window_size=[4, 4, 4, 4], first_window_size=[4, 4, 4, 4], patch_size=[2, 2, 2, 1])


# Tiny models on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(kind: str, path, tmp_path, **kw) -> R2TDataModule:
    args = dict(name=f"t_{kind}", kind=kind, path=str(path), tr=0.72, window={"length": 20}, split={"kind": "time"},
                split_dir=str(tmp_path / f"splits_{kind}"), batch_size=4)
    args.update(kw)
    return R2TDataModule(**args)


# -- NT-Xent ------------------------------------------------------------------------------------------------
Z1 = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, -1.0)]
Z2 = [(1.0, 0.2), (0.1, 1.0), (1.0, 0.5), (0.5, -1.0)]


def _hand_nt_xent(z1, z2, tau, groups=None) -> float:
    """SimCLR's NT-Xent written out: 2N views, cosine similarity / tau, positive = the other view."""
    views = [(a / math.hypot(a, b), b / math.hypot(a, b)) for a, b in list(z1) + list(z2)]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sim = [(views[i][0] * v[0] + views[i][1] * v[1]) / tau for v in views]
        denom = sum(math.exp(sim[k]) for k in range(2 * n)
                    if k != i and (groups is None or k == pos or groups[k % n] != groups[i % n]))
        total += -sim[pos] + math.log(denom)
    return total / (2 * n)


def test_nt_xent_matches_a_hand_computation_on_four_pairs():
    z1, z2 = torch.tensor(Z1), torch.tensor(Z2)
    expected = _hand_nt_xent(Z1, Z2, 0.5)
    assert expected == pytest.approx(1.0985561610872896, abs=1e-12)  # the numbers written out once
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, abs=1e-6)
    task = R2TTask(TMLP, embed_dim=8, mode="self_supervised", temperature=0.5)
    assert task.contrastive_loss(z1, z2, torch.tensor([3, 1, 0, 2])).item() == pytest.approx(expected, abs=1e-6)
    # two windows of subject 7: the other one is no negative
    grouped = _hand_nt_xent(Z1, Z2, 0.5, groups=[7, 7, 1, 2])
    assert grouped == pytest.approx(1.02901970532684, abs=1e-12) and grouped != pytest.approx(expected)
    assert task.contrastive_loss(z1, z2, torch.tensor([7, 7, 1, 2])).item() == pytest.approx(grouped, abs=1e-6)
    # the default temperature is R2T-Net's 0.07
    assert R2TTask(TMLP, embed_dim=8, mode="self_supervised").contrastive_loss(z1, z2, torch.arange(4)).item() == \
        pytest.approx(_hand_nt_xent(Z1, Z2, 0.07), rel=1e-5)
    # one subject only: no negatives, no signal
    assert task.contrastive_loss(z1, z2, torch.zeros(4, dtype=torch.long)).item() == 0.0


# -- data ---------------------------------------------------------------------------------------------------
def test_roles_come_from_run_id_patterns():
    assert assign_roles(["REST1_LR", "rfMRI_REST2_RL", "WM_LR", "GAMBLING_LR"], ["*REST*"], ["*WM*"]) == \
        ["rest", "rest", "task", None]
    assert assign_roles(["rest", "WM_LR", "motor"], ["*rest*"], None) == ["rest", "task", "task"]
    with pytest.raises(ConfigError, match="matches both"):
        assign_roles(["REST_WM"], ["*REST*"], ["*WM*"])


def test_pairs_are_rest_and_task_windows_of_one_subject(tmp_path):
    rest_h5, task_h5 = write_roi_pairs(tmp_path / "rest.h5", n_subjects=8, task_path=tmp_path / "task.h5")
    dm = _dm("roi", rest_h5, tmp_path, task_path=str(task_h5), n_rois=12, pairs_per_subject=3, batch_size=4,
             split={"kind": "subject", "fractions": [0.5, 0.25, 0.25], "seed": 0})
    dm.setup()
    rest, task = ROIStore(rest_h5), ROIStore(task_h5)
    train = set(dm.subject_split["train"])
    assert dm.paired_subjects["train"] == sorted(train) and len(train) == 4
    loader = dm.train_dataloader()
    onsets = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert batch["bold"].shape == batch["task_bold"].shape == (4, 20, 12)
            for s, r, tr_ in zip(batch["subject"].tolist(), batch["run"].tolist(), batch["task_run"].tolist()):
                assert rest.subject_ids[r] == task.subject_ids[tr_] == dm.subjects[s]
                assert rest.run_ids[r] == "REST1_LR" and task.run_ids[tr_] == "WM_LR"
                seen.append(dm.subjects[s])
            onsets.append(batch["onset"].tolist() + batch["task_onset"].tolist())
        assert sorted(seen) == sorted(list(train) * 3)  # every training subject, pairs_per_subject times
    assert len({tuple(o) for o in onsets}) == len(onsets)  # fresh random windows every batch
    val = next(iter(dm.val_dataloader()))
    assert sorted(dm.subjects[s] for s in val["subject"].tolist()) == dm.subject_split["val"]
    again = next(iter(dm.val_dataloader()))  # validation pairs are fixed
    assert torch.equal(val["onset"], again["onset"]) and torch.equal(val["task_onset"], again["task_onset"])


def test_a_subject_without_a_task_run_is_skipped_with_a_warning_or_refused(tmp_path):
    path, _ = write_roi_pairs(tmp_path / "roi.h5", n_subjects=5, no_task=(2,))
    lonely = subject_ids(5)[2]
    dm = _dm("roi", path, tmp_path, n_rois=12)
    with pytest.warns(UserWarning, match=rf"cannot be paired: {lonely} \(no task window\)"):
        dm.setup()
    assert lonely not in dm.paired_subjects["train"] and len(dm.paired_subjects["train"]) == 4
    batch = next(iter(dm.train_dataloader()))
    assert dm.subject_index[lonely] not in batch["subject"].tolist()
    rest_only = {int(s) for b in dm.predict_dataloader() for s in b["subject"]}  # rest-only inference keeps it
    assert rest_only == set(range(5))
    with pytest.raises(DataError, match=rf"{lonely} \(no task window\).*unpaired=error"):
        _dm("roi", path, tmp_path, n_rois=12, unpaired="error").setup()
    short = _dm("roi", path, tmp_path, n_rois=12, window={"length": 70})  # task runs of 60 TRs, halved by the split
    with pytest.raises(ConfigError, match="no paired train subjects"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        short.setup()


def test_store_and_recipe_mismatches_are_named(tmp_path):
    rest_h5, _ = write_roi_pairs(tmp_path / "rest.h5", n_subjects=4, task_path=tmp_path / "task.h5")
    names = [f"roi{i}" for i in range(12)]
    _, swapped = write_roi_pairs(tmp_path / "r2.h5", n_subjects=4, task_path=tmp_path / "t2.h5",
                                 roi_names=[names[1], names[0], *names[2:]])
    with pytest.raises(ConfigError, match="ROI order of .*t2.h5 differs .* at index 0"):
        _dm("roi", rest_h5, tmp_path, task_path=str(swapped)).setup()
    with pytest.raises(ConfigError, match=r"ROIs mismatch: .* 12 ROIs per TR but data.n_rois=94"):
        _dm("roi", rest_h5, tmp_path, n_rois=94, task_path=str(tmp_path / "task.h5")).setup()
    with pytest.raises(ConfigError, match=r"TR mismatch"):
        _dm("roi", rest_h5, tmp_path, tr=2.0, task_path=str(tmp_path / "task.h5")).setup()
    with pytest.raises(ConfigError, match=r"no task runs in .*task.h5.*\['\*MOTOR\*'\]"):
        _dm("roi", rest_h5, tmp_path, task_path=str(tmp_path / "task.h5"), task_runs=["*MOTOR*"]).setup()
    with pytest.raises(ConfigError, match="fewer than data.batch_size=8"):
        _dm("roi", rest_h5, tmp_path, task_path=str(tmp_path / "task.h5"), batch_size=8).setup()


@pytest.mark.parametrize("kind", ["roi", "grayordinate", "volume"])
def test_each_input_kind_yields_paired_batches_of_the_right_shape(kind, tmp_path):
    if kind == "roi":
        path, _ = write_roi_pairs(tmp_path / "roi.h5", n_subjects=4)
        dm, view, shape = _dm(kind, path, tmp_path, n_rois=12), "bold", (4, 20, 12)
    elif kind == "grayordinate":  # HCP's full CIFTI space: 91282 grayordinates per TR
        path = write_grayordinate_pairs(tmp_path / "gray", n_subjects=2, n_grayordinates=91282, rest_trs=16, task_trs=12)
        dm = _dm(kind, path, tmp_path, n_rois=91282, window={"length": 6}, batch_size=2)
        view, shape = "bold", (2, 6, 91282)
    else:
        path = write_volume_pairs(tmp_path / "vol", n_subjects=4)
        dm = _dm(kind, path, tmp_path, shape=[8, 8, 8], window={"length": 4}, batch_size=4)
        view, shape = "volume", (4, 1, 8, 8, 8, 4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    length = shape[1] if view == "bold" else shape[-1]
    assert batch[view].shape == batch[f"task_{view}"].shape == shape
    assert batch[view].dtype == (torch.float16 if kind == "volume" else torch.float32)
    assert batch["t"].shape == batch["task_t"].shape == (shape[0], length)
    torch.testing.assert_close(batch["t"][0], torch.arange(length) * 0.72)
    assert batch["subject"].dtype == torch.long and batch["subject"].shape == (shape[0],)
    meta = dm.meta
    assert meta["kind"] == kind and meta["tr"] == 0.72 and meta["window_length"] == length
    if kind != "volume":
        assert meta["n_rois"] == shape[-1]
        rest_only = next(iter(dm.predict_dataloader()))
        assert rest_only["bold"].shape[1:] == shape[1:] and "task_bold" not in rest_only
    else:
        assert meta["shape"] == [8, 8, 8]


def test_one_datamodule_subclass_per_kind_named_by_the_recipes(tmp_path):
    """R2TDataModule is the shared base; each kind is a thin subclass, the ``_target_`` of its recipe;
    ``R2TDataModule(kind=...)`` builds that subclass, and a kind its subclass does not read is refused."""
    from brainfm.data.datamodules.r2t import GrayordinateR2TDataModule, ROIR2TDataModule, VolumeR2TDataModule

    classes = {"roi": ROIR2TDataModule, "grayordinate": GrayordinateR2TDataModule, "volume": VolumeR2TDataModule}
    for kind, cls in classes.items():
        dm = _dm(kind, tmp_path / "none", tmp_path)
        assert type(dm) is cls and isinstance(dm, R2TDataModule) and dm.kind == kind
        assert dm.view == ("volume" if kind == "volume" else "bold")
        data = compose("train", [f"data=r2t_{kind}"]).data
        assert data._target_ == f"{cls.__module__}.{cls.__name__}" and data.kind == kind
    assert _dm("roi", tmp_path / "none", tmp_path).normalization == {"mode": "run", "eps": 1e-6}
    assert _dm("volume", tmp_path / "none", tmp_path).normalization == {"load": "stored"}
    with pytest.raises(ConfigError, match="must be one of"):
        _dm("cifti", tmp_path / "none", tmp_path)
    with pytest.raises(ConfigError, match="Fix: data=r2t_volume"):
        ROIR2TDataModule(name="x", kind="volume", path=str(tmp_path / "none"))


def test_swift_frame_folders_pair_the_rest_root_with_the_task_root(tmp_path):
    rng = np.random.default_rng(0)
    for root, n in (("rest", 12), ("task", 8)):
        for s in subject_ids(3):
            folder = tmp_path / root / "img" / s
            folder.mkdir(parents=True)
            for t in range(n):  # SwiFT / R2T-Net preprocessing: one (X, Y, Z, 1) fp16 tensor per TR
                torch.save(torch.from_numpy(rng.normal(size=(8, 8, 8, 1)).astype(np.float16)), folder / f"frame_{t}.pt")
    dm = _dm("volume", tmp_path / "rest", tmp_path, layout="frames", task_path=str(tmp_path / "task"),
             window={"length": 4}, batch_size=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["volume"].shape == batch["task_volume"].shape == (3, 1, 8, 8, 8, 4)
    assert sorted(batch["subject"].tolist()) == [0, 1, 2] and dm.paired_subjects["train"] == subject_ids(3)
    with pytest.raises(ConfigError, match="one run per subject.*data.task_path"):
        _dm("volume", tmp_path / "rest", tmp_path, layout="frames", window={"length": 4}).setup()


# -- grayordinate store ----------------------------------------------------------------------------------------
def test_grayordinate_store_reads_dtseries_and_checks_its_input(tmp_path):
    rng = np.random.default_rng(0)
    data = (1000 + 50 * rng.standard_normal((30, 40))).astype(np.float32)
    src = write_dtseries(tmp_path / "sub_rest.dtseries.nii", data, tr=0.8)
    read, tr, structures = read_dtseries(src)
    np.testing.assert_array_equal(read, data)
    assert tr == pytest.approx(0.8)
    assert [(s["name"], s["kind"], s["offset"], s["count"]) for s in structures] == [
        ("CIFTI_STRUCTURE_CORTEX_LEFT", "surface", 0, 20), ("CIFTI_STRUCTURE_CORTEX_RIGHT", "surface", 20, 20)]
    run = write_grayordinate_run(tmp_path / "store", "sub-01", "REST1_LR", src)
    store = GrayordinateStore(tmp_path / "store")
    meta = store.meta(0)
    assert (meta["tr"], meta["n_frames"], meta["n_grayordinates"], meta["normalization"]) == (0.8, 30, 40, "global")
    assert meta["global_mean"] == pytest.approx(data.astype(np.float64).mean()) and meta["source"] == str(src)
    z = (data.astype(np.float64) - data.mean()) / data.astype(np.float64).std()
    np.testing.assert_allclose(store.read(0, 5, 10), z[5:10], atol=2e-3)  # float16 storage
    assert store.read(0, 5, 10).shape == (5, 40) and store.n_rois == 40 and store.tr == pytest.approx(0.8)
    # per-grayordinate z-scoring; a constant grayordinate becomes 0 and is counted
    flat = data.copy()
    flat[:, 3] = 7.0
    write_grayordinate_run(tmp_path / "store", "sub-02", "REST1_LR", flat, tr=0.8, normalization="grayordinate")
    store = GrayordinateStore(tmp_path / "store")
    assert store.meta(1)["constant_grayordinates"] == 1 and (store.read(1)[:, 3] == 0).all()
    np.testing.assert_allclose(store.read(1).mean(axis=0)[:3], 0, atol=2e-3)
    with pytest.raises(DataError, match=r"series step is 0.8 s but tr=2 s"):
        write_grayordinate_run(tmp_path / "s2", "sub-01", "REST1_LR", src, tr=2.0)
    bad = data.copy()
    bad[[4, 9], 2] = np.nan
    with pytest.raises(DataError, match=r"NaN/inf at TR\(s\) 4, 9"):
        write_grayordinate_run(tmp_path / "s2", "sub-01", "REST1_LR", bad, tr=0.8)
    assert not (tmp_path / "s2" / "sub-01" / "REST1_LR").exists() and not list((tmp_path / "s2").rglob(".*tmp*"))
    with open(run / "bold.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataError, match="truncated"):
        GrayordinateStore(tmp_path / "store")
    with pytest.raises(DataError, match="does not exist"):
        GrayordinateStore(tmp_path / "nowhere")


# -- the task: augmentations, modes, errors --------------------------------------------------------------------
def test_temporal_crop_noise_and_modality_dropout():
    torch.manual_seed(3)
    task = R2TTask(TMLP, embed_dim=8, mode="self_supervised").train()
    x = torch.arange(50.0)[None, :, None].repeat(4, 1, 3)  # value = TR index
    t = torch.arange(50.0)[None].repeat(4, 1) * 0.72
    lengths = set()
    for _ in range(30):
        xc, tc = task.temporal_crop(x, t)
        n = xc.shape[1]
        lengths.add(n)
        assert 40 <= n <= 50  # int(0.8 * 50) .. 50 TRs
        assert (xc[:, 1:, 0] - xc[:, :-1, 0] == 1).all()  # a contiguous stretch of each window
        torch.testing.assert_close(tc, torch.arange(n, dtype=torch.float32)[None].repeat(4, 1) * 0.72)
    assert len(lengths) > 3
    vol = (torch.arange(10.0) + 1).view(1, 1, 1, 1, 1, 10).repeat(2, 1, 2, 2, 2, 1)
    for _ in range(10):  # volumes are zero-padded back to their TRs (Swin4D's fixed img_size)
        vc, _ = task.temporal_crop(vol, None)
        n = int((vc[0, 0, 0, 0, 0] > 0).sum())
        assert vc.shape == vol.shape and 8 <= n <= 10 and (vc[..., n:] == 0).all()
    task = R2TTask(TMLP, embed_dim=8, mode="self_supervised", noise_std=1.0, noise_prob=0.5).train()
    noisy = task.gaussian_noise(torch.zeros(16, 20, 50))
    hit = noisy != 0
    assert (hit.all(dim=1) | ~hit.any(dim=1)).all()  # an ROI gets noise at every TR or at none
    assert 0.4 < hit.any(dim=1).float().mean() < 0.6
    task = R2TTask(TMLP, embed_dim=8, mode="self_supervised", modality_dropout=1.0).train()
    batch = {"bold": torch.randn(3, 20, 12), "t": torch.arange(20.0).repeat(3, 1), "task_bold": torch.randn(3, 20, 12),
             "task_t": torch.arange(20.0).repeat(3, 1)}
    roles = set()
    for _ in range(8):
        (xr, _, mr), (xt, _, mt) = task._views(batch)
        assert xr is xt and mr == mt
        roles.add(mr)
    assert roles == {0, 1}
    task.eval()
    (xr, _, mr), (xt, _, mt) = task._views(batch)  # evaluation: no augmentation at all
    assert torch.equal(xr, batch["bold"]) and torch.equal(xt, batch["task_bold"]) and (mr, mt) == (0, 1)


def test_modes_and_errors():
    with pytest.raises(ConfigError, match="fine_tune needs task.target"):
        R2TTask(TMLP)
    with pytest.raises(ConfigError, match="task.mode='pretrain' must be one of"):
        R2TTask(TMLP, mode="pretrain")
    ssl = R2TTask(TMLP, embed_dim=8, mode="self_supervised")
    assert not any(p.requires_grad for p in ssl.head.parameters())
    assert all(p.requires_grad for p in ssl.projection.parameters())
    rest_only = {"bold": torch.randn(2, 20, 12), "t": torch.arange(20.0).repeat(2, 1), "subject": torch.arange(2)}
    with pytest.raises(ConfigError, match="needs rest/task pairs"):
        ssl.compute_losses(rest_only)
    with pytest.raises(ConfigError, match="self_supervised: its prediction head is untrained"):
        ssl.predict(rest_only)
    frozen = R2TTask(TMLP, embed_dim=8, target="wm", freeze_encoder=True)
    assert not any(p.requires_grad for p in frozen.model.parameters()) and all(p.requires_grad for p in frozen.head.parameters())
    with pytest.raises(ConfigError, match="no \\['wm'\\] labels"):
        frozen.compute_losses({**rest_only, "task_bold": rest_only["bold"], "task_t": rest_only["t"]})
    swin = R2TTask(SWIN, embed_dim=8, mode="self_supervised")
    with pytest.raises(ConfigError, match="takes volume clips"):
        swin.embed(rest_only)
    with pytest.raises(ConfigError, match=r"set model.img_size=\[8, 8, 8, 6\]"):
        swin.embed({"volume": torch.zeros(1, 1, 8, 8, 8, 6)})


def test_signature_is_the_concatenated_rest_and_task_embeddings():
    with torch.device("meta"):  # R2T-Net's sizes: a 768-wide, 12-layer temporal transformer on 91282 grayordinates
        big = R2TTask(dict(_target_="brainfm.models.sequence.SequenceTransformer", n_rois=91282, d_model=768, depth=12,
                           n_heads=12), mode="self_supervised")
    assert big.embed_dim == 1024 and big.signature_dim == 2048
    assert big.projection[-1].out_features == 1024 and big.head[0].in_features == 1024
    torch.manual_seed(0)
    task = R2TTask(TMLP, mode="self_supervised").eval()  # default embed_dim
    batch = {"bold": torch.randn(3, 20, 12), "t": torch.arange(20.0).repeat(3, 1) * 0.72,
             "task_bold": torch.randn(3, 20, 12), "task_t": torch.arange(20.0).repeat(3, 1) * 0.72}
    sig = task.signature(batch)
    assert sig.shape == (3, 2048)
    torch.testing.assert_close(sig[:, :1024], task.embed(batch))
    torch.testing.assert_close(sig.norm(dim=1), torch.full((3,), math.sqrt(2)))  # two unit vectors
    task_view = task.embedding(batch["task_bold"], batch["task_t"], 1)
    torch.testing.assert_close(sig[:, 1024:], task_view)
    assert not torch.allclose(task.embedding(batch["task_bold"], batch["task_t"], 0), task_view)  # modality embedding
    with pytest.raises(ConfigError, match="needs rest/task pairs"):
        task.signature({"bold": batch["bold"], "t": batch["t"]})
    vol = R2TTask(SWIN, mode="self_supervised").eval()
    clips = {"volume": torch.randn(2, 1, 8, 8, 8, 4).half(), "task_volume": torch.randn(2, 1, 8, 8, 8, 4).half()}
    assert vol.signature(clips).shape == (2, 2048)


# -- training -----------------------------------------------------------------------------------------------------
def _train(task: R2TTask, dm: R2TDataModule, steps: int = 50, lr: float = 3e-3) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    batches = itertools.cycle(list(dm.train_dataloader()))
    task.train()
    losses, top1 = [], []
    for _ in range(steps):
        out = task.compute_losses(dm.on_before_batch_transfer(next(batches), 0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        top1.append(out["rest_to_task_top1"].item())
    return losses, top1


@pytest.mark.parametrize("model", [TMLP, SEQ], ids=["temporal_mlp", "sequence_transformer"])
def test_fine_tune_loss_falls_on_roi_pairs(model, tmp_path):
    path, _ = write_roi_pairs(tmp_path / "roi.h5", n_subjects=6)
    labels = write_labels(tmp_path / "behavior.csv", subject_ids(6))
    dm = _dm("roi", path, tmp_path, n_rois=12, window={"length": 30}, batch_size=6,
             labels={"file": str(labels), "id_column": "Subject", "columns": {"wm_2bk": "WM_Task_2bk_Acc"}})
    dm.setup()
    stats = dm.label_stats()["wm_2bk"]
    torch.manual_seed(0)
    task = R2TTask(model, embed_dim=16, target="wm_2bk", head_hidden=16, label_mean=stats["mean"],
                   label_std=stats["std"])
    losses, top1 = _train(task, dm)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    assert np.mean(top1[-10:]) > 0.9  # rest windows find their own subject's task window


@pytest.mark.parametrize("kind", ["grayordinate", "volume"])
def test_self_supervised_loss_falls_on_grayordinates_and_volumes(kind, tmp_path):
    if kind == "grayordinate":
        dm = _dm(kind, write_grayordinate_pairs(tmp_path / "g", n_subjects=6), tmp_path, batch_size=6)
        model = {**TMLP, "n_rois": 200}
    else:
        dm = _dm(kind, write_volume_pairs(tmp_path / "v", n_subjects=6), tmp_path, window={"length": 4}, batch_size=6)
        model = SWIN
    dm.setup()
    torch.manual_seed(0)
    losses, top1 = _train(R2TTask(model, embed_dim=16, mode="self_supervised"), dm)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    assert np.mean(top1[-10:]) > 0.9


# -- the experiment preset, checkpoints and rest-only predictions ------------------------------------------------------
def test_r2t_hcp_experiment_trains_reloads_and_predicts_from_rest(tmp_path):
    from brainfm import training as train
    from brainfm.runs import build_task_from_checkpoint, load_checkpoint

    store = write_grayordinate_pairs(tmp_path / "gray", n_subjects=8, n_grayordinates=64, rest_trs=40, task_trs=30)
    labels = write_labels(tmp_path / "behavioral.csv", subject_ids(8))
    cfg = compose("train", [
        "experiment=r2t_hcp", "trainer=cpu", f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"data.path={store}", "data.n_rois=64", f"data.labels.file={labels}", "data.window.length=16",
        "data.split.fractions=[0.5,0.25,0.25]", "data.batch_size=4", "data.num_workers=0",
        "model.d_model=32", "model.depth=1", "model.n_heads=2", "trainer.max_steps=4", "trainer.val_check_interval=2",
    ])
    assert cfg.task.temperature == 0.07 and cfg.task.lambda_contrast == 0.5 and cfg.task.embed_dim == 1024
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.data.kind == "grayordinate" and cfg.data.n_rois == 64
    metrics = train.run(cfg)
    assert {"val/loss", "val/nt_xent", "val/supervised", "val/mse", "val/mae", "val/rest_to_task_top1"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())

    ckpt = load_checkpoint(Path(cfg.paths.run_dir))
    task = build_task_from_checkpoint(ckpt)
    assert type(task) is R2TTask and task.signature_dim == 2048
    from hydra.utils import instantiate as hydra_instantiate

    dm = hydra_instantiate(cfg.data, _convert_="all")
    dm.setup()
    stats = dm.label_stats("train")
    assert ckpt["hyper_parameters"]["label_mean"] == pytest.approx([stats[k]["mean"] for k in ("wm_0bk", "wm_2bk", "rel")])
    assert ckpt["brainfm"]["data_meta"]["kind"] == "grayordinate" and ckpt["brainfm"]["data_meta"]["n_rois"] == 64
    for key, value in task.state_dict().items():
        torch.testing.assert_close(value, ckpt["state_dict"][key])
    pair = next(iter(dm.val_dataloader()))
    assert task.signature(pair).shape == (len(pair["subject"]), 2048)
    fresh = build_task_from_checkpoint(ckpt, weights=False)
    assert not torch.allclose(fresh.embed(pair), task.embed(pair))
    warm = R2TTask(ckpt["hyper_parameters"]["model"], target="wm_2bk", init_from=ckpt["_path"])  # all but the head
    for key, value in warm.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] in (512, 1)  # a new head for one target
        else:
            torch.testing.assert_close(value, ckpt["state_dict"][key])

    predictions = predict_subjects(task, dm.predict_dataloader(), dm.subjects)
    test_subjects = sorted(dm.subject_split["test"])
    assert list(predictions) == test_subjects and all(p.shape == (3,) for p in predictions.values())
    out = write_prediction_csv(tmp_path / "pred" / "rest_predictions.csv", predictions, ["wm_0bk", "wm_2bk", "rel"])
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["subject_id", "prediction_wm_0bk", "prediction_wm_2bk", "prediction_rel"]
    assert [r[0] for r in rows[1:]] == test_subjects
    np.testing.assert_allclose([float(v) for v in rows[1][1:]], predictions[test_subjects[0]].numpy(), rtol=1e-5)
