"""``brainfm-extract ckpt=<checkpoint or run dir> [out=<file.h5|.parquet>] [kind=embedding|signature]
[splits=[val]] [data_path=...] [+data.<key>=...]``: one embedding or R2T signature per evaluation
window, with subject id, run, window start (TRs and seconds), TR and split (:mod:`brainfm.eval.extract`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import config_dir
from brainfm.logs import tidy_logging

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


def data_overrides(cfg: DictConfig) -> dict:
    """``data_path`` and the ``data`` node of the CLI config as one nested mapping."""
    out = OmegaConf.to_container(cfg.get("data") or OmegaConf.create({}), resolve=True)
    if cfg.get("data_path"):
        out["path"] = str(cfg.data_path)
    return out


def run(cfg: DictConfig) -> Path | None:
    from brainfm.eval.extract import export
    from brainfm.runs import find_checkpoint, run_dir_of

    fmt = cfg.get("format")
    out = cfg.get("out")
    if not out:
        fmt = fmt or "h5"
        out = run_dir_of(find_checkpoint(cfg.ckpt)) / "export" / f"{cfg.kind}s.{fmt}"
    result = export(cfg.ckpt, out, kind=str(cfg.kind), fmt=None if fmt is None else str(fmt),
                    splits=list(cfg.splits), data_overrides=data_overrides(cfg), batch_size=cfg.get("batch_size"), trainer=cfg.get("trainer"))
    if result is None:  # not the global rank 0: its windows went to rank 0's file
        return None
    path, rows, dim = result
    print(f"brainfm-extract: wrote {rows} {cfg.kind}s of dimension {dim} ({', '.join(cfg.splits)}) to {path}")
    return path


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="extract")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-extract"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
