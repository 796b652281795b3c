"""``brainfm-scale`` / ``python -m brainfm.cli.scale [run|plan|merge] model=<backbone> sizes=[...]``:
the scale test of a backbone family (:mod:`brainfm.scaling.driver`).

- ``run`` (default): account every size, plan it for Perlmutter, measure the sizes that fit this
  machine, write ``<out_dir>/rows/*.json``, ``scale.csv``, ``scale.md`` and ``scale.png``;
- ``plan``: the same without measuring, plus ``plan.csv`` (what ``slurm/perlmutter/scale.sbatch``
  submits);
- ``merge``: rebuild the table and the plot from the row files (after a SLURM array).

The first argument may name the mode (``brainfm-scale merge out_dir=...``); it is the same as
``mode=merge``. ``--cfg job`` prints the composed config.
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

MODES = ("run", "plan", "merge")


def run(cfg: DictConfig) -> None:
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from brainfm.scaling.driver import is_rank_zero
    from brainfm.scaling.driver import run as run_scale


    hc = HydraConfig.get()
    rows, out_dir = run_scale(cfg, list(hc.overrides.task), dict(hc.runtime.choices),
                              lambda overrides: compose(config_name="scale", overrides=overrides))
    if is_rank_zero():
        md = out_dir / "scale.md"
        if md.is_file():
            print(md.read_text())
        print(f"brainfm-scale: wrote {out_dir / 'scale.csv'}, {md} and {out_dir / 'scale.png'}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="scale")
def _main(cfg: DictConfig) -> None:
    tidy_logging()
    with exit_on_brainfm_error("brainfm-scale"):
        run(cfg)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in MODES:  # `brainfm-scale merge ...` == `mode=merge`
        sys.argv[1:2] = [f"mode={sys.argv[1]}"]
    _main()


if __name__ == "__main__":
    main()
