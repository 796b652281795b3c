"""Plain helpers the tests share (fixtures live in conftest.py); a test file defines only what it alone uses.

- overrides: :data:`MODEL` / :data:`CPU` (the tiny deterministic model and 2 gloo ranks of the multi-process tests),
  :data:`CPU_QUIET`, :data:`QUIET` (a quiet 2-step CPU run), :func:`supervised_on`;
- training: in this process :func:`train_in` / :func:`train_quiet`, in a subprocess :func:`train_command` /
  :func:`train_subprocess` with :func:`subprocess_env`; what a run logged: :func:`train_losses`,
  :func:`logged_steps`; test-only callbacks referenced from Hydra overrides
  (``+callbacks.x._target_=helpers.CrashAtStep``): :class:`CrashAtStep`, :class:`PauseAtStep`;
- entry points: :func:`exit_status` (status and output of a ``main``);
- data and references: :func:`labelled_roi_store`, :func:`shared_fixtures` / :func:`parity_fixture` (the parity
  tests' reference outputs), :func:`check_backbone_contract`;
- Brainmarks: :func:`require_brainmarks`, :func:`brainmarks_smoke_test`."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from brainfm.config import repo_root
from brainfm.errors import ConfigError
from brainfm.models.backbone import Backbone

#: 7-way subject classification on the embedded data, dropout 0: strategies must agree up to float order
MODEL = ["experiment=gpt", "task=supervised", "task.target=subject", "task.kind=multiclass", "task.num_classes=7",
         "task.optimizer.lr=1e-3", "task.scheduler.warmup_fraction=0", "model.d_model=32", "model.depth=1",
         "model.dropout=0", "model.attn_dropout=0", "data.window.length=40", "data.window.min_length=null",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
         "trainer.enable_model_summary=false", "logger=csv", "callbacks.progress_bar=null"]
#: 2 gloo ranks on the CPU for the sharded strategies
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "trainer.num_nodes=1",
       "+trainer.strategy.process_group_backend=gloo"]
#: CPU training without a progress bar, a model summary or TensorBoard (the run's length left to the test)
CPU_QUIET = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv"]
#: a quiet 2-step CPU run
QUIET = [*CPU_QUIET, "trainer.max_steps=2", "trainer.val_check_interval=2"]


def subprocess_env() -> dict:
    """The environment of a ``brainfm-train`` subprocess: no SLURM variables, one thread, ``tests/`` on the
    path (for ``helpers.CrashAtStep``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


class SimulatedCrash(RuntimeError):
    pass


class CrashAtStep(Callback):
    """Raise before the training batch that would make global step ``step`` (a crashed job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash at step {trainer.global_step}")


class PauseAtStep(Callback):
    """After optimizer step ``step``: write ``marker`` and wait (at most ``timeout`` s) until the run's
    ResumeCheckpoint has received Ctrl-C, so that a test sends SIGINT at a known step."""

    def __init__(self, step: int, marker: str, timeout: float = 120.0) -> None:
        self.step, self.marker, self.timeout = step, Path(marker), timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        from brainfm.training.callbacks import ResumeCheckpoint

        if trainer.global_step != self.step:
            return
        resume = next(c for c in trainer.callbacks if isinstance(c, ResumeCheckpoint))
        self.marker.write_text(str(self.step))
        deadline = time.monotonic() + self.timeout
        while not resume._interrupt_received and time.monotonic() < deadline:
            time.sleep(0.02)


def check_backbone_contract(model, batch: dict, any_tr: bool) -> None:
    """The backbone contract (brainfm.models.backbone): shapes of ``features`` and ``pooled``, ``pooled_batch``,
    the token hook composing to ``pooled`` (or refused), inputs read by ``input_keys``."""
    model.eval()
    assert isinstance(model, Backbone) and model.any_tr is any_tr
    inputs = model.inputs({**batch, "subject": torch.zeros(2)})
    assert len(inputs) == len(model.input_keys)
    with torch.no_grad():
        pooled = model.pooled(*inputs)
        features = model.features(*inputs)
        assert pooled.shape == (2, model.out_dim)
        assert features.ndim == 3 and features.shape[0] == 2
        torch.testing.assert_close(model.pooled_batch(batch), pooled)
        if model.token_dim is not None:
            tokens = model.embed_inputs(*inputs)
            assert tokens.shape[-1] == model.token_dim
            torch.testing.assert_close(model.pool_tokens(tokens), pooled)
        else:
            with pytest.raises(ConfigError, match="no token-level hook"):
                model.embed_inputs(*inputs)
    with pytest.raises(ConfigError, match=str(list(model.input_keys)).replace("[", r"\[").replace("]", r"\]")):
        model.inputs({"other": torch.zeros(1)})


def labelled_roi_store(root: Path, n_subjects: int = 60, n_rois: int = 12, n_trs: int = 48, atlas: str = "toy",
                       strength: float = 1.2, seed: int = 0) -> Path:
    """A synthetic ROI store ``root/syn.h5`` (TR 0.72 s, one run per subject) with a learnable label ``gender``
    (class M: a latent signal shared by 4 ROIs), stored as ``/labels/gender`` (protocol=logistic/probe read it) and as
    the phenotype table ``root/gender.csv`` (:data:`LABELS_CSV` trains ``task=supervised task.target=gender`` on it)."""
    import numpy as np

    from brainfm.data.stores.roi import write_roi_h5

    rng = np.random.default_rng(seed)
    subjects = [f"s{i:03d}" for i in range(n_subjects)]
    labels, series = [], []
    for i in range(n_subjects):
        x = rng.normal(size=(n_rois, n_trs))
        x[:4] += (strength if i % 2 else 0.0) * rng.normal(size=n_trs)
        series.append(100.0 + 5.0 * x)
        labels.append("M" if i % 2 else "F")
    root.mkdir(parents=True, exist_ok=True)
    (root / "gender.csv").write_text("subject,gender\n" + "".join(f"{s},{g}\n" for s, g in zip(subjects, labels)))
    return write_roi_h5(root / "syn.h5", {atlas: series}, subjects, 0.72,
                        {atlas: [f"r{k}" for k in range(n_rois)]}, labels={"gender": labels})


def supervised_on(store: Path, *model: str, n_rois: int = 12, atlas: str = "toy", window: int = 24) -> list[str]:
    """Overrides that train ``task=supervised`` on the ``gender`` label of :func:`labelled_roi_store` (2 steps)."""
    return [*model, "task=supervised", "task.target=gender", "task.kind=binary",
            f"data.labels={{file: {store.parent / 'gender.csv'}, id_column: subject, columns: {{gender: gender}}, "
            "categories: {gender: [F, M]}}", f"data.path={store}", f"data.atlas={atlas}", f"data.n_rois={n_rois}",
            f"data.window.length={window}", "data.window.min_length=null", *QUIET]


def exit_status(capsys, main: Callable, *args) -> tuple[int, str]:
    """``main(*args)`` of an entry point, its ``SystemExit`` caught: ``(exit status, stdout + stderr)``."""
    try:
        main(*args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def train_in(tmp: Path, *overrides: str) -> tuple[Path, dict]:
    """``brainfm-train`` with ``overrides``, its outputs and splits under ``tmp``: ``(run directory, metrics)``."""
    from brainfm import training as train
    from brainfm.config import compose

    cfg = compose("train", [f"paths.output_dir={tmp}/outputs", f"paths.split_dir={tmp}/splits", *overrides])
    metrics = train.run(cfg)
    return Path(cfg.paths.run_dir), metrics


def train_losses(run_dir: Path) -> dict[int, float]:
    """The ``train/loss`` a run logged to ``csv/metrics.csv``, by step."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of the ``train/loss`` rows of a run's ``csv/metrics.csv``, in order, repeats kept."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def train_quiet(tmp: Path, *overrides: str) -> Path:
    """:func:`train_in` on the CPU with :data:`CPU_QUIET` before ``overrides``: the run directory, checked to hold
    ``checkpoints/last.ckpt`` and ``config.yaml``."""
    run_dir, _ = train_in(tmp, *CPU_QUIET, *overrides)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    return run_dir


def train_command(tmp: Path, run: str, data: Path, *extra: str) -> list[str]:
    """``brainfm-train`` of the tiny :data:`MODEL` on ``data``, as run ``run`` with outputs and splits under ``tmp``
    (its run directory ``tmp/gpt/<run>``), for a subprocess with :func:`subprocess_env`."""
    return [sys.executable, "-m", "brainfm.cli.train", *MODEL, f"data.path={data}", f"paths.output_dir={tmp}",
            f"paths.split_dir={tmp}/splits", f"run_name={run}", *extra]


def train_subprocess(tmp: Path, run: str, data: Path, *extra: str, crash: bool = False,
                     timeout: float = 900) -> tuple[Path, str]:
    """:func:`train_command` run to its end in the repository root, checked to exit 0 (with ``crash``: to fail at
    :class:`CrashAtStep`): ``(run directory, stdout + stderr)``."""
    out = subprocess.run(train_command(tmp, run, data, *extra), env=subprocess_env(), capture_output=True, text=True,
                         timeout=timeout, cwd=repo_root(), check=False)
    if crash:
        assert out.returncode != 0 and "simulated crash" in out.stderr, out.stdout[-3000:] + out.stderr[-5000:]
    else:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return tmp / "gpt" / run, out.stdout + out.stderr


def shared_fixtures(name: str) -> Path:
    """``<shared>/fixtures/<name>``: reference outputs that the parity tests compare with (``BRAINFM_SHARED``, by
    default the ``shared`` folder beside the repository)."""
    return Path(os.environ.get("BRAINFM_SHARED", repo_root().parent / "shared")) / "fixtures" / name


def parity_fixture(folder: Path) -> tuple[dict, Callable[[str], dict[str, torch.Tensor]]]:
    """A parity fixture folder's ``info.json`` (``{}`` without one) and a loader of its safetensors files; the test is
    skipped without safetensors or without the folder."""
    safetensors = pytest.importorskip("safetensors.torch")
    if not folder.is_dir():
        pytest.skip(f"parity fixtures not found at {folder} (set BRAINFM_SHARED)")
    info = json.loads((folder / "info.json").read_text()) if (folder / "info.json").is_file() else {}
    return info, lambda f: safetensors.load_file(str(folder / f))


def brainmarks_smoke_test(run: Path, cwd: Path, timeout: float) -> tuple[int, list[str], str]:
    """``BRAINFM_CKPT=<run> python -m brainmarks.models.test_models brainfm`` (Brainmarks' own smoke test, its code as
    installed) in ``cwd``: ``(exit status, its pytest summary lines, stdout + stderr)``. test_models calls pytest.main
    without passing its status on, so the summary line is what says how it went."""
    env = {**os.environ, "BRAINFM_CKPT": str(run), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "brainmarks.models.test_models", "brainfm"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    return out.returncode, re.findall(r"=+ (.*\d+ (?:passed|failed|errors?|skipped).*) in [\d.]+s", text), text


def require_brainmarks(module: str = "brainmarks.models.connectome") -> None:
    """Skip the test when brainmarks (``module`` of it) is not installed; an error instead under
    ``BRAINFM_REQUIRE_BRAINMARKS`` (``make test`` sets it)."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("BRAINFM_REQUIRE_BRAINMARKS"):
            raise ImportError("BRAINFM_REQUIRE_BRAINMARKS is set but brainmarks is not installed. Fix: make "
                              "install-brainmarks")
        pytest.skip("brainmarks is not installed; `make install-brainmarks` installs it (make test does)")
