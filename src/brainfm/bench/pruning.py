"""Does pruning pay? The same search run twice, with the median pruner and without one: validations
(epochs of the pruner) and optimizer steps spent, wall time, and the best value found.

Both searches use the random sampler with the same seed, so they propose the same sequence of
parameters: the difference is only what the pruner stops. Run with ``scripts/bench_pruning.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from optuna.trial import TrialState

from brainfm.search.study import Search

DEFAULT_OVERRIDES = ("search=subject_probe", "search/sampler=random", "model.d_model=64", "model.depth=1",
                     "data.window.length=30", "logger=csv", "trainer.enable_progress_bar=false",
                     "trainer.enable_model_summary=false", "search.plots=false", "search.threads=1")


def run_search(pruner: str, n_trials: int, steps: int, val_every: int, seed: int, min_validations: int,
               extra: list[str], output_dir: str) -> dict:
    """One search (one worker, SQLite in ``output_dir``) with ``search/pruner=<pruner>``; its costs
    and best value."""
    overrides = [*DEFAULT_OVERRIDES, f"search/pruner={pruner}", f"search.study_name=bench_{pruner}",
                 f"search.n_trials={n_trials}", f"search.min_validations={min_validations}",
                 f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
                 f"seed={seed}", f"paths.output_dir={output_dir}", f"paths.split_dir={output_dir}/splits", *extra]
    search = Search.from_overrides(overrides)
    study = search.create()
    t0 = time.perf_counter()
    search.work(study)
    wall = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = study.best_trial
    return {
        "pruner": pruner, "trials": len(done),
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "validations": sum(int(t.user_attrs.get("validations", 0)) for t in done),
        "steps": sum(int(t.user_attrs.get("global_step", 0)) for t in done),
        "wall_s": wall, "best": float(best.value), "best_trial": best.number, "metric": search.metric,
        "params": [dict(t.params) for t in sorted(done, key=lambda t: t.number)],
    }


def table(rows: list[dict]) -> str:
    head = (f"| pruner | trials | complete | pruned | validations (epochs) | optimizer steps | wall s | "
            f"best {rows[0]['metric']} | best trial |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['pruner']} | {r['trials']} | {r['complete']} | {r['pruned']} | {r['validations']} | "
                     f"{r['steps']} | {r['wall_s']:.0f} | {r['best']:.4f} | {r['best_trial']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="trials per search (default 20)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of a trial that is not pruned")
    p.add_argument("--val-every", type=int, default=30, help="steps between validations (the pruner's steps)")
    p.add_argument("--min-validations", type=int, default=5,
                   help="validations before the median pruner may stop a trial (default 5: from scratch, val/loss "
                        "sits at chance for the first ~150 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="keep the studies here (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="extra brainfm-search overrides for both searches")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="brainfm-bench-pruning-") as tmp:
        out = args.output_dir or tmp
        for pruner in ("none", "median"):
            rows.append(run_search(pruner, args.trials, args.steps, args.val_every, args.seed, args.min_validations,
                                   args.overrides, out))
    if rows[0]["params"] != rows[1]["params"]:
        print("note: the two searches proposed different parameters (not the random sampler?)")
    none, median = rows
    print(f"\nsubject_probe search, {args.trials} trials x up to {args.steps} steps, validation every "
          f"{args.val_every} steps, median pruner from validation {args.min_validations}, random sampler seed "
          f"{args.seed}:\n")
    print(table(rows))
    print(f"\nmedian pruner: {median['validations'] / max(none['validations'], 1):.0%} of the validations, "
          f"{median['steps'] / max(none['steps'], 1):.0%} of the optimizer steps and "
          f"{median['wall_s'] / max(none['wall_s'], 1e-9):.0%} of the time of the unpruned search; best "
          f"{none['metric']} {median['best']:.4f} vs {none['best']:.4f}")
    return rows
