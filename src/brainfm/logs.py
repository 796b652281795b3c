"""Console output of brainfm's entry points and drivers: one line per message, no library noise that nobody
acts on (:func:`tidy_logging`)."""

from __future__ import annotations

import logging
import os
import warnings


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def tidy_logging() -> None:
    """One line per message: Lightning's own console handler goes (Hydra's root handler prints
    and writes the run's log file), its product tips are dropped, and the torch-version
    deprecation notes from Lightning's internals are silenced."""
    import lightning.pytorch  # noqa: F401  (its import adds the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logging.getLogger().handlers:
            logger.handlers.clear()
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())  # filters act on the emitting logger only
    # numexpr (imported by pandas, e.g. for Brainmarks' Arrow data) logs "NumExpr defaulting to N threads" at
    # INFO: a note about its own thread pool, nothing brainfm or the user acts on
    logging.getLogger("numexpr.utils").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # brainfm's datamodules save the training sampler's position in the checkpoint themselves
    # (StoreDataModule.state_dict) and fast-forward it on resume, which Lightning cannot see
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning warns whenever `srun` is on PATH (a login node, a workstation with SLURM's client) and
        # the process was not started by it. Outside a SLURM job brainfm runs in this one process on
        # purpose; inside one (SLURM_JOB_ID set), brainfm's sbatch templates launch every rank with srun,
        # and a job that does not still gets Lightning's hint.
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
