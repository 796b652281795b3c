"""Data: stores (how bytes sit on disk), datasets (what a sample is), datamodules, splits."""

from brainfm.data.datamodules.roi import ROIDataModule
from brainfm.data.datamodules.volume import VolumeDataModule
from brainfm.data.datasets.volume import VolumeClipDataset, VolumeClipLoader
from brainfm.data.normalization import ROINormalizer
from brainfm.data.stores.roi import ROIStore, write_roi_h5
from brainfm.data.stores.volume import VolumeStore, write_volume_run

__all__ = [
    "ROIDataModule", "ROINormalizer", "ROIStore", "write_roi_h5",
    "VolumeStore", "write_volume_run", "VolumeClipDataset", "VolumeClipLoader", "VolumeDataModule",
]
