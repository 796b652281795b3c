"""``brainfm-train`` / ``python -m brainfm.cli.train``: compose the config and train it
(:func:`brainfm.training.run`). Any key is overridable (``trainer.max_steps=100``); ``--cfg job`` prints the
composed config; ``ckpt_path=auto`` (or ``last``) resumes the run. Exit status 2 for a brainfm error (one line
with its fix), 130 for Ctrl-C (after ``last.ckpt`` and the resume command).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import config_dir
from brainfm.logs import tidy_logging
from brainfm.training import TrainingInterrupted, build, resume_command, run  # noqa: F401  (the training API, as before)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-train"):
        try:
            run(cfg)
        except TrainingInterrupted:
            sys.exit(130)  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
        except KeyboardInterrupt:  # before training started (or a second Ctrl-C outside Lightning's loop)
            print("brainfm-train: interrupted (Ctrl-C) before a checkpoint was saved", file=sys.stderr)
            sys.exit(130)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
