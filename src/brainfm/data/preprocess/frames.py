"""Convert SwiFT/TFF/R2T frame folders (``img/<subject>/frame_<t>.pt``) into a volume store.

Sharded, resumable and indexed like :mod:`brainfm.data.preprocess.volumes`: shard ``I/N`` converts
``subjects[I::N]`` of the sorted subject folders, finished subjects are skipped, and every converted
(or found finished but unindexed) subject is merged into ``<output>/index.parquet``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainfm.data.orientation import FRAMES_ORIENTATION
from brainfm.data.preprocess.runner import parse_shard, run_all
from brainfm.data.preprocess.volumes import RunResult, finished_runs, resolve_crop_pad
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.index import IndexWriter
from brainfm.data.stores.rundir import safe_name
from brainfm.data.stores.volume import CropPad, VolumeStore, write_volume_run
from brainfm.errors import ConfigError, DataError


class _FramesSource:
    """One subject of a :class:`FrameStore` as a writer frame source."""

    def __init__(self, store: FrameStore, i: int) -> None:
        self.store, self.i = store, i
        self.name = str(store.path(i))
        self.n_frames = int(store.lengths[i])
        self.spatial_shape = store.shape

    def read(self, t0: int, t1: int) -> np.ndarray:
        return self.store.read_clip(self.i, t0, t1 - t0)


def _convert_one(root: str, tr: float, subject: str, output: str, crop_pad, target_shape, normalization: str,
                 overwrite: bool):
    store = FrameStore(root, tr, subjects=[subject], normalization=normalization)
    out_subject = safe_name(subject)
    result = RunResult(out_subject, "frames", str(store.path(0)), "failed")
    try:
        bg = float(store._frame(0, 0).flat[0])

        def background(vmean, vmin, vmax, valid):  # SwiFT: voxels equal to the corner voxel's value
            return valid & ~((vmin == bg) & (vmax == bg)), f"voxels != background value {bg:g} (frame_0 voxel [0,0,0])"

        cp = resolve_crop_pad(crop_pad, target_shape, store.shape)
        path = write_volume_run(
            output, out_subject, "frames", _FramesSource(store, 0), tr=tr, affine=None, mask=background,
            crop_pad=cp, normalization="none", fill="zero" if bg == 0 else "min", applied_upstream=normalization,
            source=str(store.path(0)), overwrite=overwrite, orientation=FRAMES_ORIENTATION,
            extra_meta={"input_kind": "frames", "frames_background": bg, "subject_folder": subject},
        )
        result.status, result.path = "written", str(path)
    except (DataError, ConfigError) as exc:
        result.error = str(exc)
    return result


def convert_frames(
    root: str | os.PathLike,
    output: str | os.PathLike,
    tr: float,
    *,
    crop_pad: CropPad | Sequence[int] | str | None = None,
    target_shape: Sequence[int] | None = None,
    normalization: str = "global",
    subjects: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | str | None = None,
    index_every: int = 256,
) -> list:
    """Convert SwiFT/TFF/R2T frame folders into a volume store (``<output>/<subject>/frames/``).

    The values are copied as they are (they are normalized already: ``normalization`` records
    how, ``global`` for SwiFT's default); the brain mask is every voxel that differs from the
    background value at some TR (SwiFT's background value: voxel [0, 0, 0] of the first frame),
    and the background fill is ``zero`` when that value is 0, else ``min``. Every frame is
    kept (SwiFT's loader drops the last 2). The runs are declared ``LAS`` (frames carry no affine; SwiFT's
    are in FSL's orientation, :data:`brainfm.data.orientation.FRAMES_ORIENTATION`). Resumable like
    :func:`brainfm.data.preprocess.volumes.preprocess_volumes`.

    Args:
        root: folder holding ``img/`` (or the ``img`` folder). output: store root.
        tr: repetition time in seconds. crop_pad, target_shape: as ``preprocess_volumes`` (e.g.
            ``"swift_hcp"`` pads HCP 75x93x81 frames to 96^3 once, instead of at every load).
        subjects: subject folders (default: all). workers: parallel processes.
        shard: ``(I, N)`` or ``"I/N"``: convert ``subjects[I::N]`` of the sorted subjects (None: all).
        index_every: merge index rows after this many subjects (and every 60 s, and at the end).

    Returns:
        One :class:`~brainfm.data.preprocess.volumes.RunResult` per subject of the shard, sorted.

    Raises:
        DataError: unreadable or inconsistent frames (all failed subjects listed; the finished
            ones stay, indexed).
        ConfigError: an invalid shard.
    """
    i_shard, n_shards = parse_shard(shard)
    store = FrameStore(root, tr, subjects)
    mine = sorted(store.subject_ids, key=lambda s: (safe_name(s), s))[i_shard::n_shards]
    Path(output).mkdir(parents=True, exist_ok=True)
    desc = "brainfm-preprocess frames" + (f" (shard {i_shard}/{n_shards})" if n_shards > 1 else "")
    with IndexWriter(output, VolumeStore.kind, every_rows=index_every) as index:
        results = finished_runs(mine, output, overwrite, index,
                                 lambda s: (safe_name(s), "frames", str(store.root / s)))
        todo = [s for s, r in zip(mine, results) if r is None]

        def indexed(k: int, r) -> None:
            if r.status == "written":
                try:
                    index.add(VolumeStore.index_row(Path(r.path)))
                except DataError as exc:  # not expected for a run just written; report it with the run
                    r.status, r.error = "failed", str(exc)

        done = run_all(_convert_one, [(str(root), float(tr), s, str(output), crop_pad, target_shape, normalization,
                                        overwrite) for s in todo], workers, progress, desc, False, on_result=indexed)
    it = iter(done)
    results = [r if r is not None else next(it) for r in results]
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise DataError(f"{len(failed)} of {len(results)} subject(s) failed:\n"
                        + "\n".join(f"  - {r.error}" for r in failed[:20])
                        + "\nFix these and run the same command again: finished subjects are skipped.")
    return results
