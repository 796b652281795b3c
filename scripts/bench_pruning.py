"""Median pruner vs no pruner on the same search (subject_probe on the embedded data): validations
and optimizer steps spent, wall time and best value, as a table.

    OMP_NUM_THREADS=1 python scripts/bench_pruning.py [--trials 20] [--steps 300] [--val-every 30] [overrides...]
"""

import logging

from brainfm.logs import tidy_logging
from brainfm.bench.pruning import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    tidy_logging()
    for name in ("optuna", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
