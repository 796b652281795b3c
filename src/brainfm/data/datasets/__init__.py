"""Datasets: what a sample is (ROI windows, volume clips, rest/task pairs)."""
