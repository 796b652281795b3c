"""``brainfm-search`` / ``python -m brainfm.cli.search``: an Optuna search over brainfm runs.

    brainfm-search search=subject_probe                          # one process, SQLite, then results
    brainfm-search search=subject_probe search.n_trials=50       # extend the same study later
    brainfm-search search=subject_probe search.storage=journal search.action=create   # before workers
    brainfm-search search=subject_probe search.storage=journal search.action=work     # each worker
    brainfm-search search=subject_probe search.action=report     # trials.csv, best.yaml, plots
    brainfm-search search=subject_probe --cfg job                # show the composed config

Arguments are Hydra overrides of ``conf/search.yaml`` (which composes ``conf/train.yaml``): any
brainfm-train override applies to every trial. Guide: README, "Hyper-parameter search".
"""

from __future__ import annotations

import logging
import sys

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import config_dir
from brainfm.errors import ConfigError
from brainfm.logs import tidy_logging

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).

ACTIONS = ("optimize", "create", "work", "report")


def _usage() -> str:
    spaces = sorted(p.stem for p in (config_dir() / "search").glob("*.yaml"))
    return (__doc__ or "") + f"\nSearch spaces (search=...): {', '.join(spaces)}\n" \
        "Samplers (search/sampler=...): tpe, random, cmaes, grid. " \
        "Pruners (search/pruner=...): median, hyperband, none.\n"


def run(overrides: list[str], show_config: bool = False) -> int:
    """Run the action ``search.action`` for ``overrides``; return the number of trials this
    process ran."""
    from omegaconf import OmegaConf

    from brainfm.search import Search

    search = Search.from_overrides(overrides)
    if show_config:
        print(OmegaConf.to_yaml(search.cfg))
        return 0
    action = str(search.cfg.search.action)
    if action not in ACTIONS:
        raise ConfigError(f"search.action={action!r} must be one of {ACTIONS}")
    if action == "create":
        study = search.create()
        n = search.counts(study)
        print(f"brainfm-search: study {search.study_name!r} in {search.storage_name}: budget {search.budget} trials, "
              f"{n['finished']} finished. Start workers with the same overrides and search.action=work", flush=True)
        return 0
    if action == "report":
        search.report(search.load())
        return 0
    study = search.create() if action == "optimize" else search.load()
    ran = search.work(study)
    search.report(study)
    return ran


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(_usage())
        return
    show = "--cfg" in args
    if show:
        i = args.index("--cfg")
        del args[i:i + (2 if i + 1 < len(args) and args[i + 1] in ("job", "all") else 1)]
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    tidy_logging()
    from hydra.errors import HydraException

    with exit_on_brainfm_error("brainfm-search"):
        try:
            run(args, show_config=show)
        except HydraException as exc:  # unknown key or group choice, missing `search=`
            print(f"brainfm-search: error: {exc}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
