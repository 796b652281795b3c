"""Data: stores (how bytes sit on disk), datasets (what a sample is), datamodules, splits."""

from brainfm.data.datamodule import ROIDataModule
from brainfm.data.normalization import ROINormalizer
from brainfm.data.roi_store import ROIStore, write_roi_h5
from brainfm.data.volume_store import VolumeStore, write_volume_run
from brainfm.data.volumes import VolumeClipDataset, VolumeClipLoader, VolumeDataModule

__all__ = [
    "ROIDataModule", "ROINormalizer", "ROIStore", "write_roi_h5",
    "VolumeStore", "write_volume_run", "VolumeClipDataset", "VolumeClipLoader", "VolumeDataModule",
]
