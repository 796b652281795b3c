"""brainfm: a training stack for fMRI foundation models.

Data flows one way: store -> dataset (windows, pairs, masks) -> datamodule -> task(model) ->
metrics/logger/checkpoint. See ``DESIGN.md`` in the shared folder and the README.
"""

__version__ = "0.1.0"
