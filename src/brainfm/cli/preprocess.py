"""``brainfm-preprocess``: NIfTI / BIDS / fMRIPrep or SwiFT frame folders -> brainfm's stores.

    brainfm-preprocess volumes --input <folder|BIDS|fMRIPrep> --output <store>
        [--pattern GLOB] [--space MNI152NLin2009cAsym] [--tr S] [--crop-pad X0 X1 Y0 Y1 Z0 Z1 | PRESET]
        [--target-shape 96 96 96] [--normalization global|none] [--fill min|zero]
        [--mask auto|nonzero|threshold|epi|all|<mask.nii.gz>] [--nan error|fill|drop-run]
        [--orientation LAS|RAS] [--shard I/N] [--workers N] [--overwrite]
    brainfm-preprocess frames --input <folder with img/> --output <store> --tr S [--crop-pad ...] [--shard I/N]
    brainfm-preprocess parcellate --input <folder|BIDS|fMRIPrep> --atlas <labels|maps NIfTI|schaefer400|difumo64>
        --output rois.h5 [--roi-names names.tsv] [--atlas-name NAME] [--tr S] [--nan error|fill|drop-run]
        [--shard I/N] [--merge-only] [--overwrite] [--workers N]
    brainfm-preprocess info <store>

--orientation: the voxel orientation every run is stored in (axis codes as nibabel's aff2axcodes writes them).
Default LAS, FSL's, which SwiFT (Kim et al., NeurIPS 2023; Transconnectome/SwiFT) and NeuroSTORM were trained on
and their released weights expect; fMRIPrep writes RAS (Brainmarks PR #44 flips it for them). Each run is
reoriented from its NIfTI affine before crop/pad; meta.json and the index record orientation and
source_orientation, and a checkpoint refuses a store of another orientation. SwiFT frame folders (frames) are
declared LAS.

--crop-pad takes six integers in axis order (x_before x_after y_before y_after z_before z_after;
negative values crop) or a SwiFT preset: swift_hcp (75x93x81 -> 96^3; SwiFT's torch pad
(8, 7, 2, 1, 11, 10) lists Z first), swift_abcd_rest (79x97x85), swift_ukb (91x109x91).

Sharding: --shard I/N does runs[I::N] of the runs sorted by (subject, run) (0-based I). Without it,
a SLURM job array gives the shard (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of
SLURM_ARRAY_TASK_COUNT), else 0/1 (every run). Shards may run at the same time on one output.

TR: --tr, else the JSON sidecar's RepetitionTime, else the NIfTI header's pixdim[4] in its time unit
(xyzt_units s/ms/us, converted to seconds). A header with no time unit (nibabel and many converters write
pixdim[4] = 1 and no unit), pixdim[4] = 0, or a TR outside 0.1-30 s is refused with the fix --tr <seconds>,
never read as 1 s; a header TR that disagrees with --tr or the sidecar is printed as a warning (the given TR
is used).

Resuming: a stopped or requeued job skips finished runs (each is written to a temporary name first,
then renamed). volumes/frames keep <store>/index.parquet listing every finished run.

--nan: brain voxels that are NaN/inf at some TRs make the run fail (error, default: the file and the
0-based TRs are named, nothing is written), are replaced by the voxel's temporal mean (fill,
recorded in meta.json), or drop the run with a warning (drop-run). Voxels NaN at every TR are
background.

parcellate writes one part per run (<output>.parts/<subject>/<run>.npz); the process that finishes
the last part merges them into the HDF5 and removes the parts (--merge-only: just merge).
See docs/preprocess.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.deprecations import current_flags
from brainfm.errors import ConfigError

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


def _crop_pad(values: list[str] | None):
    if not values:
        return None
    if len(values) == 1 and not values[0].lstrip("-").isdigit():
        return values[0]
    if len(values) != 6 or not all(v.lstrip("-").isdigit() for v in values):
        raise ConfigError(f"--crop-pad takes 6 integers (x_before x_after y_before y_after z_before z_after) "
                          f"or a preset name, got {values}")
    return [int(v) for v in values]


def _shard(args: argparse.Namespace) -> tuple[int, int]:
    from brainfm.data.preprocess.runner import resolve_shard

    return resolve_shard(args.shard)


def _report(results, output: Path, what: str = "run", shard: tuple[int, int] = (0, 1)) -> None:
    for r in results:
        for w in r.warnings:
            print(f"warning: {w}", file=sys.stderr)
    written = sum(r.status == "written" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    dropped = sum(r.status == "skipped-nan" for r in results)
    where = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    print(f"{output}{where}: wrote {written} {what}(s), skipped {skipped} finished before"
          + (f", dropped {dropped} with NaN/inf (skipped-nan)" if dropped else ""))


def _volumes(args: argparse.Namespace) -> None:
    from brainfm.data.preprocess.volumes import preprocess_volumes

    shard = _shard(args)
    results = preprocess_volumes(
        args.input, args.output, pattern=args.pattern, space=args.space, tr=args.tr,
        crop_pad=_crop_pad(args.crop_pad), target_shape=args.target_shape, normalization=args.normalization,
        fill=args.fill, mask=args.mask, workers=args.workers, overwrite=args.overwrite,
        progress=not args.no_progress, fail_fast=args.fail_fast, nan=args.nan, shard=shard,
        orientation=args.orientation,
    )
    _report(results, args.output, shard=shard)
    _info_line(args.output)


def _frames(args: argparse.Namespace) -> None:
    from brainfm.data.preprocess.frames import convert_frames

    shard = _shard(args)
    results = convert_frames(
        args.input, args.output, args.tr, crop_pad=_crop_pad(args.crop_pad), target_shape=args.target_shape,
        normalization=args.normalization_applied, subjects=args.subjects, workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress, shard=shard,
    )
    _report(results, args.output, "subject", shard)
    _info_line(args.output)


def _parcellate(args: argparse.Namespace) -> None:

    from brainfm.data.preprocess.parcellate import run_parcellation
    from brainfm.data.stores.roi import ROIStore

    shard = _shard(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped runs are printed below
        report = run_parcellation(
            args.input, args.atlas, args.output, pattern=args.pattern, space=args.space, tr=args.tr,
            roi_names=args.roi_names, atlas_name=args.atlas_name, use_brain_mask=not args.no_brain_mask,
            workers=args.workers, progress=not args.no_progress, nan=args.nan, shard=shard,
            merge_only=args.merge_only, overwrite=args.overwrite,
        )
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    where = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    if not args.merge_only and not report.up_to_date:
        print(f"{report.parts}{where}: parcellated {report.written} run(s), skipped {report.skipped} with a part "
              f"before" + (f", dropped {report.dropped} with NaN/inf (skipped-nan)" if report.dropped else ""))
    if report.output is None:
        print(f"{args.output}: not merged yet: runs of other shards have no part. The shard that finishes last "
              f"merges them; or run the same command with --merge-only once every shard is done")
    else:
        state = ("up to date (nothing to do):" if report.up_to_date else "wrote" if report.merged
                 else "merged by another shard:")
        print(f"{state} {ROIStore(report.output, preload=False)}")


def _info_line(root: Path) -> None:
    from brainfm.data.stores.volume import VolumeStore

    print(VolumeStore(root))


def _orientation(stored: str | None, source: str | None) -> str:
    """``LAS (from RAS)``, ``LAS`` (not reoriented) or ``orientation unknown`` (a run indexed before orientations
    were recorded: ``brainfm-data index <store>`` records it from the run's affine)."""
    if stored is None:
        return "orientation unknown"
    return stored if source in (None, stored) else f"{stored} (from {source})"


def _info(args: argparse.Namespace) -> None:
    from brainfm.data.stores.volume import VolumeStore

    store = VolumeStore(args.store)
    print(store)
    crops = store.crop_pads()
    orientations, sources = store.column("orientation"), store.column("source_orientation")
    for i in range(len(store)):  # from the run index: no run folder is opened
        st = store.run_stats(i)
        print(f"  {store.subject_ids[i]}/{store.run_ids[i]}: {st['n']} TRs, TR {store.trs[i]:g} s, "
              f"{st['normalization']}/{st['fill']}, {_orientation(orientations[i], sources[i])}, crop/pad {crops[i]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="brainfm-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, tr_required: bool = False):
        p.add_argument("--input", type=Path, required=True)
        p.add_argument("--output", type=Path, required=True)
        p.add_argument("--tr", type=float, default=None, required=tr_required,
                       help="repetition time in seconds (default: JSON sidecar, else the NIfTI header's pixdim[4] "
                            "when its time unit is s/ms/us and the TR is 0.1-30 s; a header without one is refused "
                            "and asks for --tr; a header TR that disagrees with --tr is reported)")
        p.add_argument("--workers", type=int, default=1, help="parallel processes (one run each)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--shard", default=None, metavar="I/N",
                       help="do runs[I::N] of the runs sorted by (subject, run), I 0-based (default: the SLURM "
                            "array task, SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT, "
                            "else 0/1)")

    def nan_policy(p):
        p.add_argument("--nan", choices=["error", "fill", "drop-run"], default="error",
                       help="brain voxels NaN/inf at some TRs: error (name the file and TRs, write nothing), fill "
                            "(the voxel's temporal mean), drop-run (skip the run with a warning)")

    def grid(p):
        p.add_argument("--crop-pad", nargs="+", default=None, metavar="N",
                       help="6 ints in axis order (x_before x_after y_before y_after z_before z_after; "
                            "negative crops) or a preset: swift_hcp, swift_abcd_rest, swift_ukb")
        p.add_argument("--target-shape", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                       help="output grid; centred crop/pad unless --crop-pad is given")
        p.add_argument("--overwrite", action="store_true", help="rewrite finished runs")

    p = sub.add_parser("volumes", help="4-D NIfTI runs -> volume store (normalized float16, one array per run)")
    common(p)
    grid(p)
    p.add_argument("--pattern", default=None, help="glob of the runs relative to --input")
    p.add_argument("--space", default="MNI152NLin2009cAsym", help="fMRIPrep output space")
    p.add_argument("--normalization", choices=["global", "none"], default="global")
    p.add_argument("--fill", choices=["min", "zero"], default="min", help="background value")
    p.add_argument("--mask", default="auto", help="auto | nonzero | threshold | epi | all | <mask NIfTI>")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--orientation", choices=["LAS", "RAS"], default="LAS",
                   help="voxel orientation every run is stored in (reoriented from its NIfTI affine before crop/pad). "
                        "Default LAS: FSL's, the one SwiFT's and NeuroSTORM's released weights expect (Kim et al., "
                        "NeurIPS 2023, Transconnectome/SwiFT); RAS: fMRIPrep's")
    nan_policy(p)
    p.set_defaults(func=_volumes)

    p = sub.add_parser("frames", help="SwiFT/TFF frame folders (img/<subject>/frame_<t>.pt) -> volume store")
    common(p, tr_required=True)
    grid(p)
    p.add_argument("--normalization-applied", choices=["global", "minmax", "none"], default="global",
                   help="what the frames hold (SwiFT's preprocessing: global z-norm)")
    p.add_argument("--subjects", nargs="+", default=None, help="subject folders (default: all)")
    p.set_defaults(func=_frames)

    p = sub.add_parser("parcellate", help="4-D NIfTI runs -> ROI time series HDF5 (for the sequence models)")
    common(p)
    p.add_argument("--atlas", required=True, help="labels (3-D) or maps (4-D) NIfTI, or schaefer<N> / difumo<N>")
    p.add_argument("--roi-names", type=Path, default=None, help=".tsv/.csv (index, name) or .txt (one per line)")
    p.add_argument("--atlas-name", default=None, help="name under /timeseries (default: atlas file stem)")
    p.add_argument("--pattern", default=None)
    p.add_argument("--space", default="MNI152NLin2009cAsym")
    p.add_argument("--no-brain-mask", action="store_true", help="ignore fMRIPrep brain masks")
    nan_policy(p)
    p.add_argument("--merge-only", action="store_true",
                   help="only merge the parts (<output>.parts/) of every run into the HDF5")
    p.add_argument("--overwrite", action="store_true", help="recompute this shard's parts and the output")
    p.set_defaults(func=_parcellate)

    p = sub.add_parser("info", help="describe a volume store")
    p.add_argument("store", type=Path)
    p.set_defaults(func=_info)

    args = parser.parse_args(current_flags(sys.argv[1:] if argv is None else argv, parser.prog))
    with exit_on_brainfm_error("brainfm-preprocess"):
        args.func(args)


if __name__ == "__main__":
    main()
