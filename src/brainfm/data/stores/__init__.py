"""Stores: how the bytes of fMRI runs sit on disk, behind one interface (:mod:`.base`).

| kind | class | layout |
|---|---|---|
| ``roi`` | :class:`~.roi.ROIStore` | HDF5, Brain-Semantoks layout (``timeseries/<atlas>``), its own run index |
| ``volume`` | :class:`~.volume.VolumeStore` | ``<subject>/<run>/bold.npy`` fp16 + mask + stats, ``index.parquet`` |
| ``frames`` | :class:`~.frames.FrameStore` | SwiFT/TFF ``img/<subject>/frame_<t>.pt``, optional ``index.parquet`` |
| ``grayordinate`` | :class:`~.grayordinate.GrayordinateStore` | ``<subject>/<run>/bold.npy`` fp16 (T, 91282), ``index.parquet`` |
| ``view`` | :class:`~.view.StoreView` | some runs of another store, renamed and cropped/padded |
| ``tar`` | :class:`~.lfb_tar.TarShardIndex` | Thomas et al.'s WebDataset ``.tar`` shards (``bold.pyd``, ``t_r.pyd``), streamed |
| ``brainmarks`` | :class:`~.brainmarks.BrainmarksStore` | Brainmarks' ``<name>.<space>.arrow/{train,validation,test}`` (Hugging Face Arrow), read as an ROI store (``kind`` ``roi``) |
"""

from __future__ import annotations

import os

from brainfm.data.stores.base import DEFAULT_CACHE, LRUCache, Store, StoreBase
from brainfm.errors import ConfigError

KINDS = ("roi", "volume", "frames", "grayordinate")


def open_store(kind: str, path: str | os.PathLike, *, cache: dict | None = None, atlas: str | None = None,
               preload: bool | str = "auto", tr: float | str | None = None, normalisation: str = "global"):
    """Open the store of ``kind`` at ``path`` (the one place datamodules and tools open stores).

    Args:
        kind: ``roi``, ``volume``, ``frames``, ``grayordinate`` or ``brainmarks`` (a Brainmarks Arrow folder,
            opened as an ROI store).
        path: the file (``roi``) or folder.
        cache: per-process cache sizes (``data.cache``).
        atlas, preload: ``roi`` only. tr, normalisation: ``frames`` only (frames record neither; ``tr`` is
            required).

    Raises:
        ConfigError: an unknown kind, or frames without a numeric TR. DataError: as the store classes.
    """
    if kind == "roi":
        from brainfm.data.stores.roi import ROIStore

        return ROIStore(path, atlas=atlas, preload=preload, cache=cache)
    if kind == "brainmarks":
        from brainfm.data.stores.brainmarks import BrainmarksStore

        return BrainmarksStore(path, cache=cache)
    if kind == "volume":
        from brainfm.data.stores.volume import VolumeStore

        return VolumeStore(path, cache=cache)
    if kind == "grayordinate":
        from brainfm.data.stores.grayordinate import GrayordinateStore

        return GrayordinateStore(path, cache=cache)
    if kind == "frames":
        from brainfm.data.stores.frames import FrameStore

        if isinstance(tr, bool) or not isinstance(tr, (int, float)):
            raise ConfigError(f"frame folders ({path}) carry no TR: set data.tr=<seconds>")
        return FrameStore(path, tr=float(tr), normalisation=normalisation, cache=cache)
    raise ConfigError(f"store kind {kind!r} is not one of {(*KINDS, 'brainmarks')}")


def detect_kind(path: str | os.PathLike) -> str:
    """The kind of the store at ``path``: ``roi`` (an HDF5 file), or for a folder ``brainmarks`` (Brainmarks'
    ``train/``, ``validation/``, ``test/`` Arrow splits), else the kind its run index records, else the layout
    of its first ``meta.json`` (``volume``/``grayordinate``), else ``frames`` (``img/<subject>/frame_<t>.pt``).

    Raises:
        DataError: nothing at ``path``, or a folder in none of these layouts.
    """
    import json
    from pathlib import Path

    from brainfm.data.stores.grayordinate import GRAYORDINATE_LAYOUT
    from brainfm.data.stores.index import INDEX
    from brainfm.data.stores.volume import LAYOUT as VOLUME_LAYOUT
    from brainfm.errors import DataError

    path = Path(path)
    if path.is_file():
        return "roi"
    if not path.is_dir():
        raise DataError(f"{path} does not exist")
    if all((path / split).is_dir() for split in ("train", "validation", "test")):
        return "brainmarks"
    for index in (path / INDEX, path / "img" / INDEX):
        if index.is_file():
            import pyarrow.parquet as pq

            kind = (pq.read_schema(index).metadata or {}).get(b"brainfm_kind", b"").decode()
            if kind in KINDS:
                return kind
    meta = next(path.glob("*/*/meta.json"), None)
    if meta is not None:
        try:
            layout = json.loads(meta.read_text()).get("layout")
        except (OSError, ValueError):
            layout = None
        found = {VOLUME_LAYOUT: "volume", GRAYORDINATE_LAYOUT: "grayordinate"}.get(layout)
        if found:
            return found
    img = path / "img" if (path / "img").is_dir() else path
    if next(img.glob("*/frame_0.pt"), None) is not None:
        return "frames"
    raise DataError(f"{path} is no brainfm store: no HDF5 file, run index, <subject>/<run>/meta.json, "
                    "img/<subject>/frame_<t>.pt or Brainmarks train/validation/test splits")


__all__ = ["DEFAULT_CACHE", "KINDS", "LRUCache", "Store", "StoreBase", "detect_kind", "open_store"]
