"""Results of a study, written into ``search.dir``:

- ``best.yaml``: the best trial's value, parameters, its run directory and the ``brainfm-train``
  command (an override line) that repeats it;
- ``trials.csv``: every trial (number, state, value, parameters, validations run, final metrics,
  run directory, worker);
- ``plots/optimization_history.png``, ``plots/param_importances.png``,
  ``plots/intermediate_values.png`` (Optuna's matplotlib plots).

Every file is written under a temporary name and renamed, so workers finishing at the same time
never leave a half-written file (:mod:`brainfm.io`).
"""

from __future__ import annotations

import logging
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from brainfm.io import atomic_path, atomic_write_text, save_figure

_log = logging.getLogger("brainfm.search")

# the user attribute of a trial the study skipped (over budget): Optuna state FAIL, not a failed run
SKIPPED = "brainfm:skipped"

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "intermediate_values": "plot_intermediate_values",
}


def best_overrides(search: Any, study: optuna.Study) -> list[str] | None:
    """The ``brainfm-train`` overrides of the best complete trial (those its worker composed it
    from: the base overrides and the parameters), or ``None`` when no trial completed."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    if best.user_attrs.get("overrides"):
        return list(best.user_attrs["overrides"])
    base = study.user_attrs.get("brainfm:overrides", search.train_overrides)
    return [*base, *search.space.overrides(best.params)]


def write_results(search: Any, study: optuna.Study, plots: bool = True) -> dict:
    """Write ``trials.csv``, ``best.yaml`` and the plots; print the best trial's command line.

    ``search`` is the :class:`~brainfm.search.study.Search` (not imported here: the study imports
    this module, :meth:`Search.report <brainfm.search.study.Search.report>`).

    Returns:
        the contents of ``best.yaml`` (``value`` and ``trial`` are ``None`` before any trial
        completed).
    """
    out = search.dir
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = search.counts(study)
    _write_csv(study, out / "trials.csv")
    overrides = best_overrides(search, study)
    best: dict = {"study": search.study_name, "storage": search.storage_name, "metric": search.metric,
                  "direction": search.direction, "reduce": search.reduce, "budget": search.budget,
                  "trials": {k: counts[k] for k in ("complete", "pruned", "fail", "running", "waiting")},
                  "validations_run": sum(int(t.user_attrs.get("validations", len(t.intermediate_values)))
                                         for t in trials if t.state != TrialState.RUNNING),
                  "value": None, "trial": None}
    if overrides is not None:
        bt = study.best_trial
        run_name = f"{search.study_name}-best"
        best.update({"value": float(bt.value), "trial": bt.number, "params": dict(bt.params),
                     "run_dir": bt.user_attrs.get("run_dir"), "overrides": overrides,
                     "command": train_command(overrides, run_name=run_name)})
    atomic_write_text(out / "best.yaml", yaml.safe_dump(best, sort_keys=False))
    if plots:
        write_plots(study, out / "plots")
    if overrides is not None:
        print(f"brainfm-search: study {search.study_name!r}: best trial {best['trial']} of {len(trials)}, "
              f"{search.metric}={best['value']:.6g} ({search.direction})\n"
              f"  {best['command']}\n  results: {out}/best.yaml, trials.csv, plots/", flush=True)
    else:
        print(f"brainfm-search: study {search.study_name!r} has no complete trial yet ({counts})", flush=True)
    return best


def _write_csv(study: optuna.Study, path: Path) -> None:
    df = study.trials_dataframe(attrs=("number", "state", "value", "datetime_start", "datetime_complete",
                                       "duration", "params", "user_attrs"))
    if len(df):
        df["intermediate_values"] = [len(t.intermediate_values) for t in study.get_trials(deepcopy=False)]
        df.columns = [c.replace("user_attrs_", "") for c in df.columns]
        if "overrides" in df.columns:  # lists -> one override line
            df["overrides"] = df["overrides"].map(lambda v: " ".join(v) if isinstance(v, list) else v)
        if SKIPPED in df.columns:
            df = df.rename(columns={SKIPPED: "skipped"})
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and intermediate values as PNG (each skipped,
    with a log line, when the study cannot draw it yet, e.g. importances before 2 complete trials)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in PLOTS.items():
        path = folder / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(ovm, fn)(study)
            first = ax.flat[0] if hasattr(ax, "flat") else ax
            if name == "intermediate_values":
                first.set_xlabel("validation (one per trainer.val_check_interval steps)")
            fig = first.figure
            save_figure(fig, path, dpi=120, bbox_inches="tight")
            written.append(path)
        except Exception as exc:  # e.g. importances need >= 2 complete trials with varying parameters
            _log.info("plot %s skipped: %s", name, exc)
    return written


def train_command(overrides: Sequence[str], run_name: str | None) -> str:
    """``brainfm-train <overrides>`` as a shell line (each override quoted when needed)."""
    parts = ["brainfm-train", *overrides, *([f"run_name={run_name}"] if run_name else [])]
    return " ".join(shlex.quote(p) for p in parts)
