"""Preprocessing: NIfTI / BIDS / fMRIPrep or SwiFT frame folders -> brainfm's stores.

Sharded (``--shard I/N`` or a SLURM job array: :mod:`~brainfm.data.preprocess.runner`), resumable
(finished runs are skipped), atomic per run, with a NaN/inf policy (``error``, ``fill``, ``drop-run``);
the volume store's run index is kept up to date and parcellation streams run by run through per-run
parts merged by the last shard. User guide: ``docs/preprocess.md``.
"""

from brainfm.data.preprocess.discover import NiftiFrames, discover_runs
from brainfm.data.preprocess.frames import convert_frames
from brainfm.data.preprocess.parcellate import ParcellationReport, load_atlas, parcellate, run_parcellation
from brainfm.data.preprocess.runner import parse_shard, resolve_shard
from brainfm.data.preprocess.volumes import (
           CROP_PAD_PRESETS,
           NAN_POLICIES,
           RunResult,
           preprocess_volumes,
           resolve_crop_pad,
)

__all__ = ["CROP_PAD_PRESETS", "NAN_POLICIES", "NiftiFrames", "ParcellationReport", "RunResult", "convert_frames",
           "discover_runs", "load_atlas", "parcellate", "parse_shard", "preprocess_volumes", "resolve_crop_pad",
           "resolve_shard", "run_parcellation"]
