"""Stores: how the bytes of fMRI runs sit on disk (ROI HDF5, volume store, frame folders, grayordinates)."""
