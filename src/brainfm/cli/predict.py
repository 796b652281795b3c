"""``brainfm-predict ckpt=<checkpoint or run dir> [out=<file.csv>] [splits=[test]] [data_path=...]
[+data.<key>=...]``: per-subject predictions as CSV ``subject_id,prediction[,...]`` from an R2T
fine-tune checkpoint (rest windows only, R2T-Net's inference) or a supervised checkpoint
(:func:`brainfm.eval.extract.predict`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.cli.extract import data_overrides
from brainfm.config import config_dir
from brainfm.logs import tidy_logging

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


def run(cfg: DictConfig) -> Path | None:

    from brainfm.eval.extract import predict_to_csv
    from brainfm.runs import find_checkpoint, run_dir_of

    out = cfg.get("out") or run_dir_of(find_checkpoint(cfg.ckpt)) / "predict" / "predictions.csv"
    splits = list(cfg.splits) if cfg.get("splits") else None
    result = predict_to_csv(cfg.ckpt, out, splits=splits, data_overrides=data_overrides(cfg),
                            batch_size=cfg.get("batch_size"), trainer=cfg.get("trainer"))
    if result is None:  # not the global rank 0
        return None
    path, frame = result
    print(f"brainfm-predict: wrote predictions of {len(frame)} subjects to {path}")
    return path


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-predict"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
