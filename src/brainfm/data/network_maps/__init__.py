"""Network maps moved to :mod:`brainfm.models.network_maps`: a map fixes the Semantoks model's
token layout, so it is kept with the model (as package data), and a model imports nothing from
``brainfm.data`` (docs/architecture.md). This name stays for code that imports it."""

from brainfm.models.network_maps import MAP_DIR, NetworkMap, available_network_maps, load_network_map

__all__ = ["MAP_DIR", "NetworkMap", "available_network_maps", "load_network_map"]
