"""The Hydra config tree: every experiment composes and instantiates; errors are Hydra's clear ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from brainfm.config import compose, config_dir

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
GROUPS = ("data", "model", "task", "trainer", "logger", "callbacks", "paths", "cluster", "experiment")


def test_groups_exist():
    for group in GROUPS:
        assert (config_dir() / group).is_dir(), group


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, overrides_for):
    cfg = compose("train", overrides_for(f"experiment={experiment}"))
    assert cfg.experiment_name == experiment
    dm = instantiate(cfg.data, _convert_="all")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with torch.device("meta"):  # paper sizes: no memory, no init time
        task = instantiate(cfg.task, model=model_cfg, data_meta={"tr": 0.72}, seed=0, _recursive_=False)
    n_params = sum(p.numel() for p in task.parameters())
    assert n_params > 0
    if experiment.startswith("lfb_") and "lstm" not in experiment:
        # Thomas et al.: ~31M parameters per model at 4 x 768 x 12 heads (1024 DiFuMo inputs)
        assert 25e6 < n_params < 35e6, n_params
    if cfg.trainer.accelerator == "gpu":  # no GPU here: the same trainer config on the CPU
        cfg = compose("train", overrides_for(f"experiment={experiment}", "trainer.accelerator=cpu",
                                             "trainer.precision=32-true"))
    trainer = instantiate(cfg.trainer, _convert_="all")
    assert trainer.max_steps == cfg.trainer.max_steps
    if "window" in cfg.data:
        assert dm.window["length"] == cfg.data.window.length
    else:
        assert dm.window["length"] == cfg.data.window.length


def test_any_key_is_overridable(overrides_for):
    cfg = compose("train", overrides_for("trainer.max_steps=7", "data.batch_size=4", "model.depth=3"))
    assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.model.depth) == (7, 4, 3)


def test_unknown_group_choice_lists_valid_choices():
    with pytest.raises(ConfigCompositionException, match=r"(?s)Could not find 'model/transformerxl'.*gpt"):
        compose("train", ["model=transformerxl"])


def test_typo_in_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="batch_sise"):
        compose("train", ["data.batch_sise=4"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainfm.cli.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_composed_config_and_lists_choices_on_error():
    out = _cli("--cfg", "job", "experiment=seq_bert", "trainer.max_steps=3")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.task._target_ == "brainfm.tasks.MaskedSequenceModeling" and cfg.trainer.max_steps == 3
    bad = _cli("task=simclrr")
    assert bad.returncode != 0
    assert "Available options" in bad.stderr and "csm" in bad.stderr


def test_cli_reports_missing_data_file_in_one_line(tmp_path):
    out = _cli(f"data.path={tmp_path}/absent.h5", f"paths.output_dir={tmp_path}")
    assert out.returncode == 2
    assert "brainfm-train: error:" in out.stderr and "brainfm-data fetch hcp_rest_roi" in out.stderr
    assert "Traceback" not in out.stderr
