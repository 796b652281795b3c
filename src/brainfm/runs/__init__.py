"""A trained run: the one public way to find, load and rebuild a checkpoint with its data contract, check data
against it and open its windows. ``brainfm-evaluate``, ``brainfm-extract``, ``brainfm-predict``,
``brainfm-interpret``, the few-subject curves, the logistic/probe protocols and the Brainmarks plugin use only
this surface.

- :mod:`brainfm.runs.checkpoint`: a run's checkpoints (:func:`find_checkpoint`, :func:`load_checkpoint`,
  :func:`run_dir_of`, :func:`checkpoint_format`: one file, a DCP or a DeepSpeed directory) and
  :func:`consolidate` (``python -m brainfm.runs consolidate <checkpoint> <out.ckpt> [--weights-only]``);
- :mod:`brainfm.runs.resume`: a run directory across jobs (:func:`resolve_resume`, :func:`refuse_fresh_start`,
  ``overwrite=true``, :func:`check_resume_strategy`);
- :mod:`brainfm.runs.contract`: the data contract (atlas and ROI order, TR or time in seconds, grid, voxel
  orientation, normalization): :func:`check_compatible`, :func:`check_orientation`, :func:`check_run_tr`,
  :func:`check_training_start`, :func:`normalizer_for`, :func:`use_checkpoint_normalization`;
- :mod:`brainfm.runs.load`: :func:`build_task_from_checkpoint` and :func:`load_run` (task + data from the run's
  ``config.yaml``, checked and normalized: a :class:`LoadedRun`);
- :mod:`brainfm.runs.windows`: the windows of a split (:func:`window_dataset`, :func:`has_split`) and
  :func:`open_windows` (the store and window maker of ``brainfm-evaluate``'s protocols).

Typical use::

    from brainfm.runs import build_task_from_checkpoint, load_checkpoint
    task = build_task_from_checkpoint(load_checkpoint("outputs/demo/run"))   # eval mode, weights loaded
"""

from brainfm.runs.checkpoint import (
    DCP_INDEX,
    DCP_META,
    WEIGHTS_ONLY_KEYS,
    checkpoint_format,
    checkpoint_step,
    consolidate,
    find_checkpoint,
    last_checkpoint,
    load_checkpoint,
    read_sharded_state_dict,
    run_dir_of,
    sharded_checkpoint_error,
)
from brainfm.runs.contract import (
    check_compatible,
    check_orientation,
    check_rois,
    check_run_tr,
    check_training_start,
    normalizer_for,
    stores_of,
    use_checkpoint_normalization,
)
from brainfm.runs.load import LoadedRun, build_task_from_checkpoint, datamodules_of, load_run, task_class
from brainfm.runs.resume import (
    RUN_OUTPUTS,
    check_resume_strategy,
    discard_outputs,
    previous_checkpoint,
    refuse_fresh_start,
    resolve_resume,
    restore_outputs,
    run_checkpoints,
    set_aside_outputs,
    temporary_checkpoint,
)
from brainfm.runs.windows import Windows, has_split, open_windows, window_dataset

__all__ = [
    "DCP_INDEX", "DCP_META", "RUN_OUTPUTS", "WEIGHTS_ONLY_KEYS", "LoadedRun", "Windows",
    "build_task_from_checkpoint", "check_compatible", "check_orientation", "check_resume_strategy", "check_rois",
    "check_run_tr", "check_training_start",
    "checkpoint_format", "checkpoint_step", "consolidate", "datamodules_of", "discard_outputs", "find_checkpoint",
    "has_split", "last_checkpoint", "load_checkpoint", "load_run", "normalizer_for", "open_windows",
    "previous_checkpoint", "read_sharded_state_dict", "refuse_fresh_start", "resolve_resume", "restore_outputs",
    "run_checkpoints", "run_dir_of", "set_aside_outputs", "sharded_checkpoint_error", "stores_of", "task_class",
    "temporary_checkpoint", "use_checkpoint_normalization", "window_dataset",
]
