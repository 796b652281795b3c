"""LightningDataModules: a store opened, checked, split and normalized, and its loaders."""
