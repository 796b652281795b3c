"""LightningDataModules: a store opened, checked, split and normalised, and its loaders."""
