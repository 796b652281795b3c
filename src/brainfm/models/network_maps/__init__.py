"""Network maps: which network (token) each ROI of a parcellation belongs to.

A network tokenizer (Brain-Semantoks; :mod:`brainfm.models.semantoks`) turns the ROIs of one
network into one token per temporal patch, so the map fixes the model's token layout. Maps ship
as YAML files in this folder (one per parcellation; the comment at the top of each documents the
grouping and its sources):

- ``aal2_94_lobes``: the 94 cerebral AAL2 regions of the embedded HCP data in 9 lobes/systems.
- ``schaefer400_7n_tian3_buckner7``: Brain-Semantoks' 457 ROIs (Schaefer-400 in 7-network order,
  Tian S3 subcortex, Buckner 7 cerebellum) in 9 networks.

File format (any of the two ``networks`` forms; ``name`` and ``n_rois`` required)::

    name: my_map
    n_rois: 5
    networks:                 # tokens in model order: name -> description, or -> {ranges, roi_pattern}
      a: first network
      b: second network
    rois:                     # by name, in the data's canonical order: [ROI name, network]
      - [roi1, a]
      ...

    networks:                 # or by index
      a: {ranges: [[0, 3]], roi_pattern: "^roi[123]$"}   # 0-based, end exclusive; pattern optional
      b: {ranges: [[3, 5]]}

A user map is a path to such a file (``model.network_map=/path/map.yaml``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from brainfm.errors import ConfigError

MAP_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class NetworkMap:
    """A resolved network map.

    Attributes:
        name: map name (file stem) or path.
        network_names: ``(N,)`` token names in model order.
        assignment: ``(V,)`` network index of every ROI, in the data's ROI order.
        atlas: the parcellation the map is for (free text).
    """

    name: str
    network_names: tuple[str, ...]
    assignment: tuple[int, ...]
    atlas: str = ""

    @property
    def n_rois(self) -> int:
        return len(self.assignment)

    @property
    def n_networks(self) -> int:
        return len(self.network_names)

    def rois_of(self, network: int | str) -> list[int]:
        """0-based ROI indices of one network (by index or name)."""
        k = self.network_names.index(network) if isinstance(network, str) else int(network)
        return [i for i, n in enumerate(self.assignment) if n == k]

    def counts(self) -> dict[str, int]:
        """ROIs per network."""
        return {name: self.assignment.count(k) for k, name in enumerate(self.network_names)}


def available_network_maps() -> list[str]:
    """Names of the maps shipped with brainfm."""
    return sorted(p.stem for p in MAP_DIR.glob("*.yaml"))


def _map_file(name: str | Path) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"network map file {path} does not exist")
        return path
    shipped = MAP_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            f"unknown network map {str(name)!r}; shipped maps: {available_network_maps()}. Fix: set "
            "model.network_map to one of them, or to the path of a YAML map file "
            "(format: brainfm.models.network_maps)."
        )
    return shipped


def _read(path: Path) -> dict:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"network map {path} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("networks"), dict) or not spec["networks"]:
        raise ConfigError(f"network map {path} needs a non-empty `networks` mapping (format: brainfm.models.network_maps)")
    if not isinstance(spec.get("n_rois"), int):
        raise ConfigError(f"network map {path} needs an integer `n_rois`")
    return spec


def _by_name(spec: dict, path: Path, names: list[str], roi_names: Sequence[str] | None) -> list[int]:
    rows = spec["rois"]
    if not isinstance(rows, list) or any(not isinstance(r, (list, tuple)) or len(r) != 2 for r in rows):
        raise ConfigError(f"network map {path}: `rois` must be a list of [ROI name, network] pairs")
    index = {n: k for k, n in enumerate(names)}
    of: dict[str, int] = {}
    for roi, net in rows:
        if net not in index:
            raise ConfigError(f"network map {path}: ROI {roi!r} is assigned to {net!r}, which is not in `networks` {names}")
        if roi in of:
            raise ConfigError(f"network map {path}: ROI {roi!r} is listed twice")
        of[str(roi)] = index[net]
    if len(of) != spec["n_rois"]:
        raise ConfigError(f"network map {path}: n_rois={spec['n_rois']} but `rois` lists {len(of)} ROIs")
    if roi_names is None:  # canonical order
        return [index[net] for _, net in rows]
    unknown = [r for r in roi_names if r not in of]
    if unknown:
        raise ConfigError(
            f"network map {spec['name']!r} ({path}) has no entry for the data's ROI(s) {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; it is made for {spec.get('atlas', 'another atlas')}. Fix: "
            "choose the map of the data's parcellation or add the ROIs to a copy of the map."
        )
    if len(set(roi_names)) != len(roi_names):
        raise ConfigError("the data's ROI names are not unique; a network map cannot be matched by name")
    return [of[r] for r in roi_names]


def _by_ranges(spec: dict, path: Path, names: list[str], roi_names: Sequence[str] | None) -> list[int]:
    n = spec["n_rois"]
    assignment = [-1] * n
    for k, name in enumerate(names):
        entry = spec["networks"][name]
        if not isinstance(entry, dict) or "ranges" not in entry:
            raise ConfigError(f"network map {path}: network {name!r} needs `ranges` (or the map needs a `rois` list)")
        pattern = re.compile(entry["roi_pattern"]) if entry.get("roi_pattern") else None
        for start, stop in entry["ranges"]:
            if not 0 <= start < stop <= n:
                raise ConfigError(f"network map {path}: range [{start}, {stop}) of {name!r} is outside [0, {n})")
            for i in range(start, stop):
                if assignment[i] != -1:
                    raise ConfigError(f"network map {path}: ROI {i} belongs to {names[assignment[i]]!r} and {name!r}")
                assignment[i] = k
                if pattern is not None and roi_names is not None and not pattern.search(str(roi_names[i])):
                    raise ConfigError(
                        f"ROI order mismatch: ROI {i} of the data is {roi_names[i]!r}, but network map "
                        f"{spec['name']!r} puts ROI {i} in network {name!r} (names matching "
                        f"{entry['roi_pattern']!r}). Fix: reorder the data's ROIs to {spec.get('atlas', 'the map')} "
                        "order (for Schaefer: the 7-network order, not the 17-network one)."
                    )
    missing = [i for i, a in enumerate(assignment) if a == -1]
    if missing:
        raise ConfigError(f"network map {path}: ROIs {missing[:10]} belong to no network")
    return assignment


def load_network_map(name: str | Path, roi_names: Sequence[str] | None = None, n_rois: int | None = None) -> NetworkMap:
    """Load a network map and match it to the data's ROIs.

    Args:
        name: a shipped map (:func:`available_network_maps`) or the path of a YAML map file.
        roi_names: the data's ROI names in its order (the ROI store's ``roi_names``; the
            checkpoint's ``data_meta.roi_names``). Name maps are matched by name; index maps check
            each name against the network's ``roi_pattern``. ``None``: the map's canonical order.
        n_rois: the data's ROI count (checked when ``roi_names`` is not given).

    Returns:
        the :class:`NetworkMap` with one network index per data ROI.

    Raises:
        ConfigError: unknown map or malformed file; an ROI-count mismatch between the map and the
            data; an ROI the map does not know; ROI names out of the map's order.
    """
    path = _map_file(name)
    spec = _read(path)
    spec.setdefault("name", path.stem)
    names = [str(k) for k in spec["networks"]]
    count = len(roi_names) if roi_names is not None else n_rois
    if roi_names is not None and n_rois is not None and len(roi_names) != int(n_rois):
        raise ConfigError(f"{len(roi_names)} ROI names given for {n_rois} ROIs")
    if count is not None and int(count) != spec["n_rois"]:
        raise ConfigError(
            f"ROI count mismatch: network map {spec['name']!r} covers {spec['n_rois']} ROIs "
            f"({spec.get('atlas', 'its atlas')}) but the data has {count} ROIs. Fix: set model.network_map to "
            f"the map of the data's parcellation (shipped: {available_network_maps()}) or write one "
            "(format: brainfm.models.network_maps)."
        )
    if "rois" in spec:
        assignment = _by_name(spec, path, names, roi_names)
    else:
        assignment = _by_ranges(spec, path, names, roi_names)
    empty = [names[k] for k in range(len(names)) if k not in set(assignment)]
    if empty:
        raise ConfigError(f"network map {path}: network(s) {empty} have no ROI")
    return NetworkMap(str(spec["name"]), tuple(names), tuple(int(a) for a in assignment), str(spec.get("atlas", "")))


__all__ = ["MAP_DIR", "NetworkMap", "available_network_maps", "load_network_map"]
