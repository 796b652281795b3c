"""What a user sees: ``brainfm-train experiment=demo`` and ``brainfm-evaluate`` (the two commands of
``make demo``, shortened) print their results and no library warnings (the causes are fixed:
scikit-learn's LogisticRegressionCV gets the arguments it asks for; Lightning's srun hint is only
kept inside a SLURM job)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import subprocess_env

from brainfm.config import repo_root

#: a warning's text, or the "file.py:123: message" line Python's and Lightning's warning formats start with
WARNING = re.compile(r"warn|deprecat|\.py:\d+: ", re.IGNORECASE)


def _run(*args: str) -> str:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    env["PYTHONWARNINGS"] = "default"  # every warning once: none may reach the output
    out = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=600,
                         cwd=repo_root())
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_demo_and_evaluate_print_no_warnings(tmp_path, hcp_h5):
    train = _run("brainfm.cli.train", "experiment=demo", "run_name=demo", "trainer.max_steps=10",
                 "trainer.val_check_interval=10", f"data.path={hcp_h5}",
                 f"paths.output_dir={tmp_path}/outputs", f"paths.split_dir={tmp_path}/splits")
    assert "finished at step 10" in train
    ckpt = tmp_path / "outputs" / "demo" / "demo" / "checkpoints" / "last.ckpt"
    evaluate = _run("brainfm.cli.evaluate", f"ckpt={ckpt}", "window_lengths=[60]")
    assert "Subject re-identification" in evaluate and "linear probe" in evaluate
    for name, text in (("brainfm-train", train), ("brainfm-evaluate", evaluate)):
        lines = [line for line in text.splitlines() if WARNING.search(line)]
        assert not lines, f"{name} printed warnings:\n" + "\n".join(lines)
    assert os.path.isfile(ckpt.parent.parent / "eval" / "metrics.json")
