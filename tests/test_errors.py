"""Errors a user meets, run through the command lines as typed (issue 20, items 5, 6 and 9): each names the
right cause and a fix that works as typed; subject splits never block another store; NIfTI TRs are never
guessed.

The entry points run in this process (``brainfm-train`` / ``brainfm-extract`` through their Hydra ``main``
with ``sys.argv`` set, ``brainfm-preprocess`` through ``main(argv)``): the same parsing, composition and
error handling as the installed commands, without a Python start per command."""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import QUIET, exit_status

from brainfm.config import compose, config_dir
from brainfm.data.stores.roi import write_roi_h5

TINY = ["model.d_model=16", "model.depth=1", "model.n_heads=2", "data.window.length=24", "data.window.min_length=null",
        "data.batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _hydra_cli(capsys, monkeypatch, module, prog: str, *args: str) -> tuple[int, str]:
    """``prog args`` (a Hydra entry point): ``(exit status, stdout + stderr)``."""
    monkeypatch.setattr(sys, "argv", [prog, *args])
    return exit_status(capsys, module.main)


def _train(capsys, monkeypatch, tmp: Path, *args: str) -> tuple[int, str]:
    from brainfm.cli import train

    return _hydra_cli(capsys, monkeypatch, train, "brainfm-train", f"paths.output_dir={tmp}/outputs",
                      f"paths.split_dir={tmp}/splits", *QUIET, *args)


def _roi_store(path: Path, subjects: list[str], n_rois: int = 12, atlases=("toy",), n_trs: int = 120,
               seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    series = {a: [100 + rng.standard_normal((n_rois, n_trs)) for _ in subjects] for a in atlases}
    return write_roi_h5(path, series, subjects, 2.0, {a: [f"{a}{i}" for i in range(n_rois)] for a in atlases})


def _on(store: Path, n_rois: int = 12) -> list[str]:
    return [f"data.path={store}", "data.atlas=toy", f"data.n_rois={n_rois}", "data.tr=2.0", *TINY]


def _one_line(text: str, prog: str = "brainfm-train") -> str:
    lines = [line for line in text.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# -- item 5: subject splits ----------------------------------------------------------------------------------------
def test_an_empty_validation_split_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    store = _roi_store(tmp_path / "one.h5", ["sub-01"])
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "data.split.kind=subject")
    line = _one_line(out)
    assert code == 2 and str(store) in line and "train 1, val 0, test 0" in line and "no val subject" in line
    assert "data.split.kind=time" in line
    assert not list((tmp_path / "splits").rglob("*.txt"))  # refused before anything was written
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "data.split.kind=time")  # the fix, as typed
    assert code == 0 and "finished at step 2" in out


def test_a_failed_run_leaves_no_split_that_blocks_another_store(tmp_path, capsys, monkeypatch):
    splits = tmp_path / "splits" / "hcp_rest_roi"
    a = _roi_store(tmp_path / "a.h5", [f"sub-{i:02d}" for i in range(5)])
    # a run that fails in the data checks writes no split at all
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(a, n_rois=13), "data.split.kind=subject")
    assert code == 2 and "ROI count mismatch" in out and not splits.exists()
    # one that fails later (a typo in the trainer) keeps the checked split of its store, under that store's key
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(a), "data.split.kind=subject", "+trainer.max_step=2")
    assert code == 2 and [p.name[:16] for p in splits.iterdir()] == ["seed0_5subjects_"]
    # another store under the same recipe (sharing 5 subject ids, as BIDS data sets do) trains with its own split
    b = _roi_store(tmp_path / "b.h5", [f"sub-{i:02d}" for i in range(8)], seed=1)
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(b), "data.split.kind=subject")
    assert code == 0 and "finished at step 2" in out and "does not list" not in out
    assert sorted(p.name[:16] for p in splits.iterdir()) == ["seed0_5subjects_", "seed0_8subjects_"]
    assert "lists 5 of these 8 subjects" in out  # said, not silent
    new = next(splits.glob("seed0_8subjects_*.txt"))
    before = new.stat().st_mtime_ns
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(b), "data.split.kind=subject", "run_name=again")
    assert code == 0 and new.stat().st_mtime_ns == before  # read back, never drawn again


def test_split_files_of_an_earlier_brainfm_are_read_when_they_list_the_data(tmp_path):
    from brainfm.data.datamodules.roi import ROIDataModule

    store = _roi_store(tmp_path / "s.h5", [f"sub-{i:02d}" for i in range(4)])
    legacy = tmp_path / "splits" / "seed0.txt"
    legacy.parent.mkdir()
    legacy.write_text("train_subjects\nsub-00\nsub-01\nval_subjects\nsub-02\ntest_subjects\nsub-03\nsub-99\n")
    kw = {"name": "s", "path": str(store), "atlas": "toy", "tr": 2.0, "n_rois": 12, "split_dir": str(legacy.parent),
          "split": {"kind": "subject"}, "window": {"length": 24}}
    dm = ROIDataModule(**kw)
    dm.setup("fit")
    assert dm.split_file == legacy and dm.subject_split == {"train": ["sub-00", "sub-01"], "val": ["sub-02"],
                                                            "test": ["sub-03"]}
    other = _roi_store(tmp_path / "o.h5", ["x1", "x2", "x3", "x4"])  # a store the old file does not list
    dm = ROIDataModule(**{**kw, "path": str(other)})
    dm.setup("fit")
    assert dm.split_file.name.startswith("seed0_4subjects_") and dm.split_file.is_file()
    first = dm.subject_split
    fewer = _roi_store(tmp_path / "f.h5", ["x1", "x2", "x4"])  # the same data set, a subject left out since
    dm = ROIDataModule(**{**kw, "path": str(fewer)})
    dm.setup("fit")
    assert dm.split_file.name.startswith("seed0_4subjects_")  # its split stays: nothing drawn again
    assert dm.subject_split == {k: [s for s in v if s != "x3"] for k, v in first.items()}
    assert sorted(p.name for p in legacy.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left


# -- item 6: errors that pointed the wrong way ------------------------------------------------------------------------
def test_a_volume_store_given_to_an_roi_recipe_is_named_with_the_volume_recipe(tmp_path, capsys, monkeypatch):
    from brainfm.data.datamodules.volume import VolumeDataModule
    from brainfm.data.stores.volume import write_volume_run

    root = tmp_path / "vols"
    rng = np.random.default_rng(0)
    for subject in ("sub-01", "sub-02"):
        write_volume_run(root, subject, "rest", 1000 + rng.standard_normal((12, 6, 6, 6)), tr=2.0, mask="all",
                         affine=np.eye(4))
    code, out = _train(capsys, monkeypatch, tmp_path, f"data.path={root}")
    line = _one_line(out)
    assert code == 2 and "does not exist" not in line and "is a volume store" in line
    assert f"data=volumes data.path={root} data.shape=[6,6,6]" in line
    # the data part of the fix, as typed, builds the volume datamodule on that store
    fix = re.search(r"data=volumes (data\.path=\S+) (data\.shape=\S+)", line)
    cfg = compose("train", [f"paths.split_dir={tmp_path}/splits", "data=volumes", fix.group(1), fix.group(2),
                            "data.window.length=4", "data.split.kind=time", "data.num_workers=0"])
    dm = VolumeDataModule(**{k: v for k, v in _plain(cfg.data).items() if k != "_target_"})
    dm.setup("fit")
    assert dm.meta["shape"] == [6, 6, 6]


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def test_a_checkpoint_on_other_rois_names_its_atlas_and_the_fixes_work_as_typed(tmp_path, capsys, monkeypatch):
    from brainfm.cli import extract

    store = _roi_store(tmp_path / "s.h5", [f"sub-{i:02d}" for i in range(3)])
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "run_name=r")
    assert code == 0
    run = tmp_path / "outputs" / "adhoc" / "r"
    other = _roi_store(tmp_path / "o.h5", ["x1", "x2"], n_rois=20, atlases=("schaefer", "gordon"))
    args = [f"ckpt={run}", f"out={tmp_path}/e.h5", f"data_path={other}"]
    code, out = _hydra_cli(capsys, monkeypatch, extract, "brainfm-extract", *args)
    line = _one_line(out, "brainfm-extract")
    assert code == 2 and "has no atlas 'toy'" in line and "Fix: +data.atlas=<name>" in line  # the + it needs here
    code, out = _hydra_cli(capsys, monkeypatch, extract, "brainfm-extract", *args, "+data.atlas=schaefer")
    line = _one_line(out, "brainfm-extract")
    assert code == 2 and "was trained on 12 ROIs of atlas 'toy'" in line and "has 20 (atlas 'schaefer')" in line
    assert "set data.n_rois" not in line and "brainfm-preprocess parcellate" in line and "--atlas toy" in line


def test_a_typo_in_any_target_gets_did_you_mean_and_the_fix_runs(tmp_path, capsys, monkeypatch):
    store = _roi_store(tmp_path / "s.h5", [f"sub-{i:02d}" for i in range(3)])
    for typo, fix in (("+trainer.max_step=3", "trainer.max_steps=3"),
                      ("+data.batchsize=4", "data.batch_size=4"),
                      ("+callbacks.model_checkpoint.save_topk=1", "callbacks.model_checkpoint.save_top_k=1"),
                      ("+model.d_modle=16", "model.d_model=16")):
        code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), typo)
        line = _one_line(out)
        assert code == 2 and "did you mean" in line and f"Fix: {fix} " in line, line
        assert "TypeError" not in out
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "trainer.max_steps=3", "run_name=fixed")
    assert code == 0 and "finished at step 3" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_trainer_without_a_gpu_says_so(tmp_path, capsys, monkeypatch):
    code, out = _train(capsys, monkeypatch, tmp_path, "trainer=gpu")
    line = _one_line(out)
    assert code == 2 and "torch.cuda.is_available() is False" in line and "Fix: trainer=cpu" in line
    assert "MisconfigurationException" not in out


def test_batch_size_and_tr_are_checked_as_values(tmp_path, capsys, monkeypatch):
    store = _roi_store(tmp_path / "s.h5", [f"sub-{i:02d}" for i in range(3)])
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "data.batch_size=0")
    line = _one_line(out)
    assert code == 2 and "data.batch_size=0 must be at least 1" in line and "ZeroDivisionError" not in out
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "data.tr=0")
    line = _one_line(out)
    assert code == 2 and "data.tr must be > 0 seconds" in line and "mismatch" not in line
    code, out = _train(capsys, monkeypatch, tmp_path, *_on(store), "data.batch_size=200")  # more than the windows
    line = _one_line(out)
    assert code == 2 and "no training batch" in line and "finished at step 0" not in out


_SUGGESTION = re.compile(r"(?<![+\w.{])(data|model|task)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=")


def _literal(node: ast.AST) -> str | None:
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal(v) or "" for v in node.values)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.FormattedValue):
        return "{}"
    return None


def _message_parts(tree: ast.AST):
    """Raised errors, warnings and log lines (and the ``fix``/``msg`` strings they include)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            yield node.exc
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "warn", "warning", "info", "error"):
            yield node
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("fix", "msg")
                                                  for t in node.targets):
            yield node.value


@functools.cache
def _suggested_keys() -> dict[str, set[str]]:
    """``{group: {key}}`` of the ``<group>.<key>=`` fixes in brainfm's messages (an occurrence that opens its
    literal, ``f"data.tr={tr} must be ..."``, describes the value the user set, and is not counted)."""
    from brainfm.config import repo_root

    found: dict[str, set[str]] = {"data": set(), "model": set(), "task": set()}
    for path in (repo_root() / "src" / "brainfm").rglob("*.py"):
        for message in _message_parts(ast.parse(path.read_text())):
            for node in ast.walk(message):
                for m in _SUGGESTION.finditer(_literal(node) or ""):
                    if m.start() > 0:
                        found[m.group(1)].add(m.group(2))
    return found


#: (config, key): a fix that is never offered for that config, and why
_NOT_OFFERED = {
    **{(f"data={c}", "data.shape"): "R2T offers it for volume stores only" for c in ("r2t_roi", "r2t_grayordinate")},
    ("data=r2t_volume", "data.n_rois"): "R2T offers it for ROI and grayordinate stores only",
    ("data=r2t_grayordinate", "data.layout"): "offered for volume frame folders only",
    **{(f"data={c}", "data.normalization.load"): "offered for volume clips only"
       for c in ("hcp_rest_roi", "gw_rest_roi", "r2t_roi", "r2t_grayordinate", "lfb_tar", "brainmarks")},
    **{(f"data={c}", "data.split.train_fraction"): "a time split: refused for streamed shards"
       for c in ("lfb_tar",)},
    **{(f"data={c}", "data.window.min_length"): "offered by the volume datamodule only"
       for c in ("r2t_roi", "r2t_grayordinate", "r2t_volume")},
    ("data=r2t_roi", "data.layout"): "offered for volume stores and frame folders only",
    **{(f"data={c}", "data.normalization.statistics"): "offered by the volume datamodule only (ROI: normalization.mode)"
       for c in ("hcp_rest_roi", "gw_rest_roi", "r2t_roi", "r2t_grayordinate", "r2t_volume", "lfb_tar", "brainmarks")},
    **{(f"data={c}", "data.normalization.mode"): "offered for ROI stores only (volumes: normalization.stored/load)"
       for c in ("volumes", "nifti_toy", "r2t_volume", "r2t_grayordinate", "abcd", "abcd_task", "abide", "embarc",
                 "hcp", "hcp_task", "oasis3", "ukb", "ukb_task")},
    **{(f"data={c}", "data.path"): "offered for ROI files and Brainmarks folders; the recipes read data.store/root"
       for c in ("abcd", "abcd_task", "abide", "embarc", "hcp", "hcp_task", "oasis3", "ukb", "ukb_task")},
    ("model=brainnetcnn", "model.readout.include_input"): "offered with pooling=correlation|covariance, which "
                                                          "BrainNetCNN refuses (its own node pooling)",
    ("task=net_bert", "task.init_from"): "offered by task=r2t only",
}


def _has(node, dotted: str) -> bool:
    """``dotted`` is a key of ``node`` (also with a mandatory ``???`` value: an override sets it without ``+``)."""
    for part in dotted.split("."):
        child = node._get_node(part, validate_access=False) if hasattr(node, "_get_node") else None
        if child is None:
            return False
        node = child
    return True


@pytest.mark.parametrize("group", ["data", "model", "task"])
def test_every_suggested_key_exists_where_its_target_takes_it(group):
    """Every ``data.<key>=`` / ``model.<key>=`` / ``task.<key>=`` fix in brainfm's messages works as typed (no
    ``+``) in every config of that group whose ``_target_`` takes the key: the key is in the composed config."""
    from brainfm.instantiate import accepted_arguments

    suggested = _suggested_keys()[group]
    assert suggested
    missing = []
    for yaml in sorted((config_dir() / group).glob("*.yaml")):
        node = compose("train", [f"{group}={yaml.stem}"])[group]
        takes = set(accepted_arguments(node.get("_target_"))) if "_target_" in node else set()
        for key in sorted(suggested):
            where = (f"{group}={yaml.stem}", f"{group}.{key}")
            if key.split(".")[0] in takes and not _has(node, key) and where not in _NOT_OFFERED:
                missing.append(": ".join(where))
    assert not missing, "suggested keys missing from configs whose target takes them:\n" + "\n".join(missing)


# -- item 9: a NIfTI header without a usable TR ----------------------------------------------------------------------
def _nifti(path: Path, pixdim4: float | None, unit: str | None) -> Path:
    rng = np.random.default_rng(0)
    data = np.zeros((8, 8, 6, 10), dtype=np.float32)
    data[2:-2, 2:-2, 1:-1] = 800 + 20 * rng.standard_normal((4, 4, 4, 10))
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))  # nibabel's defaults: pixdim[4] 1, no units
    if unit is not None:
        img.header.set_xyzt_units("mm", unit)
    if pixdim4 is not None:
        img.header["pixdim"][4] = pixdim4
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _preprocess(capsys, *argv: str) -> tuple[int, str]:
    from brainfm.cli.preprocess import main

    return exit_status(capsys, main, ["volumes", *argv, "--no-progress"])


@pytest.mark.parametrize(("pixdim4", "unit", "why"), [
    (None, None, "time unit (xyzt_units) is 'unknown'"),  # nibabel's default header: pixdim[4] = 1, no unit
    (0.0, "sec", "pixdim[4] is 0"),
])
def test_a_nifti_without_a_usable_tr_is_refused_and_tr_fixes_it(tmp_path, capsys, pixdim4, unit, why):
    from brainfm.data.stores.volume import VolumeStore

    src = _nifti(tmp_path / "in" / "sub-01_bold.nii.gz", pixdim4, unit)
    code, out = _preprocess(capsys, "--input", str(src.parent), "--output", str(tmp_path / "s"))
    assert code == 2 and "no repetition time" in out and why in out and "Fix: pass --tr <seconds>" in out
    assert not (tmp_path / "s" / "sub-01").exists()
    code, out = _preprocess(capsys, "--input", str(src.parent), "--output", str(tmp_path / "s"), "--tr", "0.8")
    assert code == 0 and "warning" not in out and VolumeStore(tmp_path / "s").tr == 0.8


def test_header_tr_in_msec_is_converted_and_a_disagreeing_tr_is_reported(tmp_path, capsys):
    from brainfm.data.stores.volume import VolumeStore

    src = _nifti(tmp_path / "ms" / "sub-01_bold.nii.gz", 720.0, "msec")
    code, out = _preprocess(capsys, "--input", str(src.parent), "--output", str(tmp_path / "a"))
    assert code == 0 and "warning" not in out and VolumeStore(tmp_path / "a").tr == 0.72
    code, out = _preprocess(capsys, "--input", str(src.parent), "--output", str(tmp_path / "b"), "--tr", "2")
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warning) == 1, out
    assert "header says TR 0.72 s" in warning[0] and "--tr gives 2 s; using 2 s" in warning[0]
    assert VolumeStore(tmp_path / "b").tr == 2.0
    src = _nifti(tmp_path / "far" / "sub-01_bold.nii.gz", 45.0, "sec")
    code, out = _preprocess(capsys, "--input", str(src.parent), "--output", str(tmp_path / "c"))
    assert code == 2 and "implausible repetition time 45 s" in out and "0.1-30 s" in out


def test_brainfm_convert_names_a_missing_or_foreign_file_in_one_line(tmp_path, capsys):
    from brainfm.cli.convert import main

    code, out = exit_status(capsys, main, ["swift", str(tmp_path / "missing.ckpt"), str(tmp_path / "out.safetensors")])
    assert code == 2 and out.startswith("brainfm-convert: error: ") and "missing.ckpt" in out
    torch.save({"state_dict": {"not.a.swift.key": torch.zeros(1)}}, tmp_path / "other.ckpt")
    code, out = exit_status(capsys, main, ["swift", str(tmp_path / "other.ckpt"), str(tmp_path / "out.safetensors")])
    assert code == 2 and "brainfm-convert: error: " in out and "Traceback" not in out
    assert not (tmp_path / "out.safetensors").exists()
