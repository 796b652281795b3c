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

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _main(cfg: DictConfig) -> None:
    from brainfm.training import TrainingInterrupted, run

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
