"""Data: how fMRI sits on disk and what a training sample is, in layers that only import downwards.

- ``stores/``: one interface over every layout (ROI HDF5, volume store, SwiFT frame folders,
  grayordinates, restricted views), the run index, bounded per-process caches, synthetic stores;
- ``windows.py``, ``datasets/``: the window grid, the resumable sampler, the one collate; ROI windows,
  volume clips, rest/task pairs;
- ``datamodules/``: one base (store opening, TR/ROI/grid checks, splits, labels, normalization state)
  and the ROI, volume (+ data set recipes), R2T and multi-data-set datamodules;
- ``preprocess/``: NIfTI / BIDS / fMRIPrep / SwiFT frames -> stores, sharded and resumable;
- ``splits.py``, ``phenotypes.py``, ``normalization.py``: one implementation each.

Nothing is imported here, so ``brainfm-data`` and the stores start without torch or Lightning.
"""
