"""Thin command-line entry points (``brainfm-train``, ``brainfm-evaluate``, ``brainfm-data``)."""
