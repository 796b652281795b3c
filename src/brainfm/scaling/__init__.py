"""Scale testing: parameter / FLOP / memory accounting on the meta device (and fake tensors), a
Perlmutter plan per size, measured training steps, and the scale table and plot
(``brainfm-scale``, README "Scale test").

- :mod:`~brainfm.scaling.accounting`: parameters (total, trainable, per stage) and FLOPs per sample;
- :mod:`~brainfm.scaling.memory`: the simulated memory of a training step, model states per GPU
  (DeepSpeed's estimators), the smallest configuration that fits;
- :mod:`~brainfm.scaling.measure`: measured steps (time, peak memory, throughput, MFU);
- :mod:`~brainfm.scaling.families`: how each backbone family is fed;
- :mod:`~brainfm.scaling.table`, :mod:`~brainfm.scaling.plot`: the table (row files, CSV,
  Markdown) and the log-log plot;
- :mod:`~brainfm.scaling.driver`: the scale test over sizes.

Names are imported lazily, so that reading and plotting a table (the notebook) does not import
torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FlopCount": "accounting", "ParameterCount": "accounting", "build_on_meta": "accounting",
    "count_flops": "accounting", "count_parameters": "accounting",
    "Family": "families", "family_of": "families", "register_family": "families",
    "LiveTensorMemory": "memory", "ModelStates": "memory", "Placement": "memory", "StepMemory": "memory",
    "model_state_memory": "memory", "place": "memory", "simulate_step_memory": "memory",
    "plot_scale": "plot", "merge": "table", "read_rows": "table", "write_table": "table",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"brainfm.scaling.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'brainfm.scaling' has no attribute {name!r}")
