"""``brainfm-interpret ckpt=<checkpoint or run dir> [method=integrated_gradients|smoothgrad] [target=predicted|all|<k>]
[split=val] [windows=[0,3]] [subjects=[...]] [out_dir=...] [data_path=...] [+data.<key>=...]``: attribution maps of
a fine-tuned checkpoint (captum Integrated Gradients or SmoothGrad; :mod:`brainfm.eval.interpret`): NIfTI maps in the
scan's space for volume models, ROI x time HDF5 + PNG for sequence models, and ``attributions_<method>.csv``."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.cli.extract import data_overrides
from brainfm.config import config_dir
from brainfm.logs import tidy_logging

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).

#: the keys of conf/interpret.yaml that are :class:`brainfm.eval.interpret.Options`
OPTION_KEYS = ("method", "target", "n_steps", "internal_batch_size", "nt_samples", "nt_samples_batch_size", "stdevs",
               "nt_type", "baseline", "output", "split", "windows", "subjects", "max_windows", "batch_size", "grid",
               "seed", "tolerance")


def options(cfg: DictConfig):
    """The :class:`~brainfm.eval.interpret.Options` of a CLI config (its keys as given, checked by ``Options.check``)."""
    from brainfm.eval.interpret import Options

    values = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
              for k in OPTION_KEYS if k in cfg and cfg[k] is not None}
    return Options(**values)


def run(cfg: DictConfig) -> Path:
    from brainfm.eval.interpret import interpret_checkpoint

    opts = options(cfg)
    opts.check()  # a bad key fails before the checkpoint and its data are read
    out, frame = interpret_checkpoint(cfg.ckpt, cfg.get("out_dir"), opts, data_overrides=data_overrides(cfg),
                                      trainer=cfg.get("trainer"))
    worst = frame["relative_delta"].max()
    note = f"; largest |delta| / |f(x) - f(baseline)| = {worst:.2%}" if opts.method == "integrated_gradients" else ""
    print(f"brainfm-interpret: wrote {opts.method} maps of {len(frame)} window(s) x target(s) of "
          f"{frame['subject_id'].nunique()} subject(s) to {out}{note}")
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="interpret")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-interpret"):
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
