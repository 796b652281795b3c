"""Brain-Semantoks files: several atlas data sets of one HDF5 file read as one ROI axis in the
network map's order (Schaefer-400 7-network + Tian-3 + Buckner-7 = 457 ROIs), per-atlas
statistics, an atlas the file lacks read as zeros with ``roi_mask`` and its network tokens masked in
SemantoksEncoder and SimDINO, experiment=semantoks training on such files, and the linear probe
callback (probe_at_epochs)."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from brainfm.config import compose
from brainfm.models.network_maps import load_network_map
from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.errors import ConfigError, DataError

ATLASES = {"schaefer400": 400, "tian3": 50, "buckner7": 7}
SEM_MAP = load_network_map("schaefer400_7n_tian3_buckner7", n_rois=457)
N_SUBJECTS, N_TRS, TR = 8, 120, 2.0
SMALL = ("model.network_map=schaefer400_7n_tian3_buckner7", "model.patch_size=10", "model.conv_channels=16",
         "model.long_conv_channels=16", "model.depth=1", "model.n_heads=2", "task.head.hidden_dim=32",
         "task.head.bottleneck_dim=16", "data.batch_size=4", "data.window.length=40", "data.window.min_length=20",
         "data.tr=2.0", "data.n_rois=457", "trainer.log_every_n_steps=1", "task.masking.frequency=1.0",
         "task.network_loss_decay=null")


pytestmark = pytest.mark.usefixtures("one_thread")


def roi_names(atlas: str) -> list[str]:
    if atlas == "schaefer400":  # the 7-network order the map checks (7Networks_LH_Vis_1 ...)
        return [f"7Networks_{'LH' if i < 200 else 'RH'}_{SEM_MAP.network_names[SEM_MAP.assignment[i]]}_{i}"
                for i in range(400)]
    return [f"{atlas}_{i}" for i in range(ATLASES[atlas])]


def series(atlas: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, ATLASES[atlas]])
    out = []
    for s in range(N_SUBJECTS):
        scale = 1.0 + 0.5 * (s % 2)  # the 'sex' label changes the signal's spread a little
        x = np.cumsum(rng.normal(size=(ATLASES[atlas], N_TRS)), axis=1) * 0.3 * scale
        out.append((50.0 + 10 * rng.random((ATLASES[atlas], 1)) + x).astype(np.float32))
    return out


def write_file(path, atlases=tuple(ATLASES), seed=0):
    subjects = [f"sub-{i:02d}" for i in range(N_SUBJECTS)]
    return write_roi_h5(path, {a: series(a, seed) for a in atlases}, subjects, TR, {a: roi_names(a) for a in atlases},
                        labels={"sex": [s % 2 for s in range(N_SUBJECTS)]})


def write_reference_layout(path, atlases=tuple(ATLASES), seed=0):
    """The file as Brain-Semantoks' example.ipynb writes it: timeseries/<atlas> NaN-padded, long_subject_id,
    no ts_len, no statistics, no TR attribute."""
    with h5py.File(path, "w") as f:
        for a in atlases:
            runs = series(a, seed)
            data = np.full((N_SUBJECTS, ATLASES[a], N_TRS + 10), np.nan, dtype=np.float32)
            for i, r in enumerate(runs):
                data[i, :, :N_TRS - i] = r[:, :N_TRS - i]
            f.create_dataset(f"timeseries/{a}", data=data, chunks=(1, ATLASES[a], 32))
        f.create_dataset("long_subject_id", data=np.array([f"sub-{i:02d}".encode() for i in range(N_SUBJECTS)]))
    return path


@pytest.fixture
def three_atlas_h5(tmp_path):
    return write_file(tmp_path / "semantoks.h5")


@pytest.fixture
def no_tian_h5(tmp_path):
    return write_file(tmp_path / "no_tian.h5", atlases=("schaefer400", "buckner7"))


# -- the store --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preload", [False, True])
def test_atlases_read_side_by_side_in_map_order(three_atlas_h5, preload):
    store = ROIStore(three_atlas_h5, atlas=["schaefer400", "tian3", "buckner7"], preload=preload)
    assert (store.n_rois, store.atlas, store.atlas_offsets) == (457, "schaefer400+tian3+buckner7", (0, 400, 450))
    assert store.roi_mask.all() and store.roi_mask.shape == (457,)
    assert store.roi_names == roi_names("schaefer400") + roi_names("tian3") + roi_names("buckner7")
    assert store.tr == TR and store.has_run_stats
    singles = {a: ROIStore(three_atlas_h5, atlas=a, preload=False) for a in ATLASES}
    x = store.read(3, 10, 50)
    assert x.shape == (40, 457) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.concatenate([singles[a].read(3, 10, 50) for a in ATLASES], axis=1))
    out = np.empty((20, 457), np.float32)
    np.testing.assert_array_equal(store.read(3, 10, 50, 2, out=out), x[::2])
    # per-atlas statistics: each ROI z-scored over its own run, as the single-atlas stores do
    stats = store.run_stats(3)
    for a, off in zip(ATLASES, store.atlas_offsets):
        np.testing.assert_allclose(stats["mean"][off:off + ATLASES[a]], singles[a].run_stats(3)["mean"])
    z = ROINormalizer.fit(store, "run").apply(3, x)
    ref = np.concatenate([ROINormalizer.fit(singles[a], "run").apply(3, singles[a].read(3, 10, 50)) for a in ATLASES], 1)
    np.testing.assert_allclose(z, ref, rtol=1e-6, atol=1e-6)
    assert store.validate() == []
    # a single string keeps today's behaviour (one atlas, no mask)
    assert singles["tian3"].roi_mask is None and singles["tian3"].n_rois == 50


def test_reference_layout_without_lengths_statistics_or_tr(tmp_path):
    path = write_reference_layout(tmp_path / "ref.h5")
    store = ROIStore(path, atlas=["schaefer400", "tian3", "buckner7"], preload=False)
    assert store.tr is None and not store.has_run_stats
    assert list(store.lengths) == [N_TRS - i for i in range(N_SUBJECTS)]  # from the NaN padding
    stats = store.run_stats(2)
    data = store.read(2).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], data.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], data.std(0), rtol=1e-5)


def test_missing_atlas_reads_zeros_with_a_mask(no_tian_h5):
    store = ROIStore(no_tian_h5, atlas=["schaefer400", "tian3", "buckner7"], preload=False)
    assert store.n_rois == 457 and store.atlas_offsets == (0, 400, 450)
    assert store.roi_mask[:400].all() and not store.roi_mask[400:450].any() and store.roi_mask[450:].all()
    x = store.read(1, 0, 30)
    assert (x[:, 400:450] == 0).all() and np.abs(x[:, :400]).min() > 0
    np.testing.assert_array_equal(x[:, 450:], ROIStore(no_tian_h5, atlas="buckner7").read(1, 0, 30))
    stats = store.run_stats(1)
    assert (stats["mean"][400:450] == 0).all() and (stats["std"][400:450] == 1).all()
    assert store.roi_names[400] == "tian3:0" and store.has_run_stats
    for mode in ("run", "global"):
        norm = ROINormalizer.fit(store, mode, train_segments=[(r, 0, 60) for r in range(len(store))])
        z = norm.apply(1, x)
        assert (z[:, 400:450] == 0).all() and np.isfinite(z).all()
    assert store.validate() == []  # the zeros are not "constant ROIs"
    assert "(407 read)" in repr(store)
    # an unknown atlas needs its ROI count; <name>:<n> gives it
    with pytest.raises(DataError, match=r"no atlas 'tian5'.*tian5:<n_rois>"):
        ROIStore(no_tian_h5, atlas=["schaefer400", "tian5"])
    mine = ROIStore(no_tian_h5, atlas=["schaefer400", "mine:12"])
    assert mine.n_rois == 412 and mine.atlas == "schaefer400+mine:12"
    # the store's atlas string (saved in checkpoints' data_meta) opens the same store again
    again = ROIStore(no_tian_h5, atlas=store.atlas)
    assert again.atlases == store.atlases and (again.roi_mask == store.roi_mask).all()
    assert ROIStore(no_tian_h5, atlas=mine.atlas).n_rois == 412
    with pytest.raises(DataError, match="holds none of the atlases"):
        ROIStore(no_tian_h5, atlas=["tian3"])
    with pytest.raises(DataError, match="listed twice"):
        ROIStore(no_tian_h5, atlas=["schaefer400", "schaefer400"])
    with pytest.raises(DataError, match="has 400 ROIs"):
        ROIStore(no_tian_h5, atlas=["schaefer400:100"])


def test_dataset_batches_carry_the_roi_mask(no_tian_h5):
    from brainfm.data.datasets.roi import ROIWindowDataset
    from brainfm.data.windows import collate_windows

    store = ROIStore(no_tian_h5, atlas=["schaefer400", "tian3", "buckner7"])
    ds = ROIWindowDataset(store, ROINormalizer.fit(store, "run"), [(r, 0, 100) for r in range(len(store))], 40)
    batch = collate_windows([ds[i] for i in range(3)])
    assert batch["roi_mask"].shape == (3, 457) and batch["roi_mask"].dtype == torch.bool
    assert not batch["roi_mask"][:, 400:450].any() and batch["roi_mask"][:, :400].all()
    assert "roi_mask" not in ROIWindowDataset(ROIStore(no_tian_h5, atlas="buckner7"), ROINormalizer("none"), [(0, 0, 100)], 40)[0]


# -- the encoder ----------------------------------------------------------------------------------------
def _encoder(**kw):
    from brainfm.models.semantoks import SemantoksEncoder

    torch.manual_seed(0)
    return SemantoksEncoder(457, network_map="schaefer400_7n_tian3_buckner7", patch_size=10, conv_channels=16,
                            long_conv_channels=16, depth=2, n_heads=2, **kw).eval()


@pytest.mark.parametrize("mode", ["pad", "mask"])
def test_missing_network_tokens_do_not_depend_on_their_inputs(mode):
    enc = _encoder(missing_tokens=mode)
    roi_mask = torch.ones(2, 457, dtype=torch.bool)
    roi_mask[:, 400:450] = False  # Tian missing: network 7 ("Subcortex")
    assert enc.missing_networks(roi_mask, 2).nonzero()[:, 1].unique().tolist() == [7]
    bold = torch.randn(2, 40, 457)
    other = bold.clone()
    other[:, :, 400:450] = torch.randn(2, 40, 50) * 5
    with torch.no_grad():
        a, b = enc(bold, roi_mask=roi_mask), enc(other, roi_mask=roi_mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # every token, the CLS included
        torch.testing.assert_close(enc(bold, roi_mask=roi_mask[0]), a)  # (V,) broadcasts
        assert not torch.allclose(enc(bold), enc(other))  # without the mask they do
        # "pad": the other tokens never attend to the missing ones, so even the MASK token is invisible
        changed = _encoder(missing_tokens=mode)
        changed.mask_token.data += torch.randn(changed.d_model)  # (a constant shift would vanish in the LayerNorms)
        c = changed(bold, roi_mask=roi_mask)
        keep = torch.ones(a.shape[1], dtype=torch.bool)
        keep[1 + 7 * 4: 1 + 8 * 4] = False
        if mode == "pad":
            torch.testing.assert_close(c[:, keep], a[:, keep], rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(c[:, keep], a[:, keep])
        # nothing missing: the same as no mask at all
        torch.testing.assert_close(enc(bold, roi_mask=torch.ones(457, dtype=torch.bool)), enc(bold))
    with pytest.raises(ValueError, match="roi_mask"):
        enc(bold, roi_mask=torch.ones(3, 457, dtype=torch.bool))
    with pytest.raises(ConfigError, match="missing_tokens"):
        _encoder(missing_tokens="zero")


# -- experiment=semantoks on the files ----------------------------------------------------------------------
def _cfg(tmp_path, path, *extra):
    return compose("train", [f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits",
                             f"data.path={path}", "data.name=semantoks_files", "trainer.enable_progress_bar=false",
                             "trainer.enable_model_summary=false", "experiment=semantoks",
                             "data.atlas=[schaefer400,tian3,buckner7]", *SMALL, *extra])


def test_three_atlas_file_trains_experiment_semantoks(tmp_path, three_atlas_h5):
    from brainfm import training as train

    cfg = _cfg(tmp_path, three_atlas_h5, "trainer.max_steps=3", "trainer.val_check_interval=3",
               "trainer.limit_val_batches=1", "callbacks=none", "logger=csv")
    datamodule, task, trainer = train.build(cfg)
    assert datamodule.meta["n_rois"] == 457 and datamodule.meta["atlas"] == "schaefer400+tian3+buckner7"
    assert task.model.network_names == list(SEM_MAP.network_names)
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    # the checkpoint (data_meta atlas "schaefer400+tian3+buckner7") evaluates on a file that lacks Tian
    from brainfm.eval.protocol import run_reidentification

    trainer.save_checkpoint(tmp_path / "model.ckpt")
    other = write_file(tmp_path / "no_tian.h5", atlases=("schaefer400", "buckner7"), seed=1)
    report = run_reidentification(tmp_path / "model.ckpt", window_lengths=[40], data_path=other,
                                  baselines=["random_init"], probe=False)
    assert report["data"]["atlas"] == "schaefer400+tian3+buckner7"
    assert 0.0 <= report["results"]["pretrained"]["40"]["rank1"] <= 1.0


def test_file_without_tian_trains_with_its_tokens_masked(tmp_path, no_tian_h5):
    from brainfm import training as train

    cfg = _cfg(tmp_path, no_tian_h5, "trainer.max_steps=3", "trainer.limit_val_batches=0", "callbacks=none",
               "logger=none")
    datamodule, task, trainer = train.build(cfg)
    seen = []
    forward = task.model.forward

    def spy(bold, mask=None, roi_mask=None):
        seen.append(roi_mask)
        return forward(bold, mask, roi_mask)

    task.model.forward = spy
    trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == 3 and len(seen) == 3
    for roi_mask in seen:  # both views of every sample: Tian's ROIs marked missing
        assert roi_mask.shape[1] == 457 and not roi_mask[:, 400:450].any() and roi_mask[:, :400].all()
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert {"train/network_loss", "train/mask_loss"} <= set(trainer.callback_metrics)  # the masked losses ran
    # the masked tokens' inputs do not change the task's output (embedding) nor the losses' inputs
    task.model.forward = forward
    task.eval()
    batch = next(iter(datamodule.val_dataloader()))
    other = dict(batch)
    other["bold"] = batch["bold"].clone()
    other["bold"][:, :, 400:450] = torch.randn_like(other["bold"][:, :, 400:450]) * 3
    with torch.no_grad():
        torch.testing.assert_close(task.embed(other), task.embed(batch), rtol=0, atol=1e-6)
        torch.testing.assert_close(task.model(other["bold"], roi_mask=other["roi_mask"]),
                                   task.model(batch["bold"], roi_mask=batch["roi_mask"]), rtol=0, atol=1e-6)
        # the mean-token half of the embedding leaves the missing network out
        tokens = task.teacher(batch["bold"], roi_mask=batch["roi_mask"])[:, 1:]
        p = tokens.shape[1] // 9
        kept = torch.cat([tokens[:, : 7 * p], tokens[:, 8 * p:]], dim=1).mean(1)
        torch.testing.assert_close(task.embed(batch)[:, : tokens.shape[-1]], kept)


def test_simdino_losses_skip_missing_tokens():
    from brainfm.tasks.self_distillation import simdino_loss

    torch.manual_seed(0)
    s = [torch.nn.functional.normalize(torch.randn(12, 8), dim=-1) for _ in range(2)]
    t = [torch.nn.functional.normalize(torch.randn(12, 8), dim=-1) for _ in range(2)]
    keep = torch.ones(12, dtype=torch.bool)
    keep[[2, 5, 9]] = False
    loss, _ = simdino_loss(s, t, keep=keep)
    ref, _ = simdino_loss([x[keep] for x in s], [x[keep] for x in t])
    torch.testing.assert_close(loss, ref)
    rows = torch.tensor([0, 2, 4, 6])  # the coding-rate rows, then the kept among them
    loss, _ = simdino_loss(s, t, rate_rows=rows, keep=keep)
    ref_rate, _ = simdino_loss([x[keep] for x in s], [x[keep] for x in t], rate_rows=torch.tensor([0, 3, 4]))
    torch.testing.assert_close(loss, ref_rate)


# -- probe_at_epochs ---------------------------------------------------------------------------------------------
def test_probe_callback_logs_a_finite_balanced_accuracy(tmp_path, three_atlas_h5):
    import csv

    from brainfm import training as train
    from brainfm.eval.probe_callback import LinearProbeCallback

    pheno = tmp_path / "pheno.csv"
    pheno.write_text("participant,Sex,Age\n" + "".join(f"sub-{i:02d},{'MF'[i % 2]},{20 + 3 * i}\n" for i in range(N_SUBJECTS)))
    cfg = _cfg(tmp_path, three_atlas_h5, "trainer.max_steps=4", "trainer.limit_val_batches=0", "callbacks=probe",
               "logger=csv", "callbacks.probe.label=sex", "callbacks.probe.every_n_epochs=1", "callbacks.probe.epochs=[0]",
               f"callbacks.probe.labels={{file: {pheno}, id_column: participant, columns: {{sex: Sex}}, "
               "categories: {sex: [F, M]}}", "callbacks.progress_bar=null", "callbacks.resume_checkpoint=null",
               "callbacks.model_checkpoint=null", "data.window.eval_stride=20", "callbacks.probe.max_windows=64")
    datamodule, task, trainer = train.build(cfg)
    probe = next(c for c in trainer.callbacks if isinstance(c, LinearProbeCallback))
    trainer.fit(task, datamodule=datamodule)
    assert probe.history[0][0] == 0 and len(probe.history) >= 2  # before training and after epochs
    for _, _, metrics in probe.history:
        assert 0.0 <= metrics["balanced_acc"] <= 1.0 and math.isfinite(metrics["balanced_acc"])
    assert math.isfinite(float(trainer.callback_metrics["probe/sex/balanced_acc"]))
    with open(next((tmp_path / "outputs").rglob("metrics.csv"))) as f:
        logged = [r["probe/sex/balanced_acc"] for r in csv.DictReader(f) if r.get("probe/sex/balanced_acc")]
    assert len(logged) == len(probe.history) and all(math.isfinite(float(v)) for v in logged)
    # a regression label from the same table, and the store's own /labels/sex, on the trained task
    age = LinearProbeCallback("age", epochs=[1], labels={"file": str(pheno), "id_column": "participant",
                                                       "columns": {"age": "Age"}}, max_windows=64)
    assert set(age.probe(trainer, task, 1)) == {"r", "r2", "mae"}
    in_file = LinearProbeCallback("sex", every_n_epochs=1, max_windows=64)
    assert math.isfinite(in_file.probe(trainer, task, 1)["balanced_acc"])
    with pytest.raises(ConfigError, match="no such label"):
        LinearProbeCallback("iq", every_n_epochs=1).probe(trainer, task, 1)
    with pytest.raises(ConfigError, match="every_n_epochs"):
        LinearProbeCallback("sex")
    assert LinearProbeCallback("sex", every_n_epochs=5, epochs=[2]).due(2)
    assert not LinearProbeCallback("sex", every_n_epochs=5).due(4)


@pytest.mark.slow
def test_probe_and_masked_tokens_on_two_ranks_equal_one_rank(tmp_path, no_tian_h5):
    """2 gloo DDP ranks x batch 4 = 1 rank x batch 8 on a file without Tian (roi_mask, the network loss
    without the missing network), and the probe (embeddings gathered, fit on rank 0, broadcast) logs the
    same numbers."""
    import csv
    import subprocess
    import sys

    import helpers

    pheno = tmp_path / "pheno.csv"
    pheno.write_text("participant,Sex\n" + "".join(f"sub-{i:02d},{'MF'[i % 2]}\n" for i in range(N_SUBJECTS)))
    common = [f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits", f"data.path={no_tian_h5}",
              "data.name=semantoks_files", "experiment=semantoks", "data.atlas=[schaefer400,tian3,buckner7]", *SMALL,
              "data.window.min_length=40", "task.masking.frequency=0", "task.augment=null", "trainer.max_steps=4",
              "trainer.limit_val_batches=0", "callbacks=probe", "logger=csv", "callbacks.probe.label=sex",
              "callbacks.probe.every_n_epochs=1", "callbacks.probe.epochs=[0]", "callbacks.probe.max_windows=64",
              (f"callbacks.probe.labels={{file: {pheno}, id_column: participant, columns: {{sex: Sex}}, "
               "categories: {sex: [F, M]}}"), "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
              "data.window.eval_stride=20", "trainer.enable_progress_bar=false"]
    rows = {}
    for run, extra in (("one", ["data.batch_size=8"]), ("two", ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=4"])):
        out = subprocess.run([sys.executable, "-m", "brainfm.cli.train", *common, f"run_name={run}", *extra],
                             env=helpers.subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-4000:]
        with open(tmp_path / "outputs" / "semantoks" / run / "csv" / "metrics.csv") as f:
            rows[run] = list(csv.DictReader(f))
    for key in ("probe/sex/balanced_acc", "train/loss"):
        one = [float(r[key]) for r in rows["one"] if r.get(key)]
        two = [float(r[key]) for r in rows["two"] if r.get(key)]
        assert len(one) == len(two) > 0 and all(math.isfinite(v) for v in one)
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
