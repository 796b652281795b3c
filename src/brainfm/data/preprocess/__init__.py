"""Preprocessing: NIfTI / BIDS / fMRIPrep or SwiFT frame folders -> brainfm's stores."""

from brainfm.data.preprocess.discover import NiftiFrames, discover_runs
from brainfm.data.preprocess.frames import convert_frames
from brainfm.data.preprocess.parcellate import load_atlas, parcellate
from brainfm.data.preprocess.volumes import (
           CROP_PAD_PRESETS,
           RunResult,
           preprocess_volumes,
           resolve_crop_pad,
)

__all__ = ["CROP_PAD_PRESETS", "NiftiFrames", "RunResult", "convert_frames", "discover_runs", "load_atlas",
           "parcellate", "preprocess_volumes", "resolve_crop_pad"]
