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
from brainfm.data.stores.brainmarks import BrainmarksStore
from brainfm.data.stores.frames import FrameStore
from brainfm.data.stores.grayordinate import GrayordinateStore
from brainfm.data.stores.kinds import KINDS, detect_kind, wrong_kind_message
from brainfm.data.stores.roi import ROIStore
from brainfm.data.stores.volume import VolumeStore
from brainfm.errors import ConfigError


def open_store(kind: str, path: str | os.PathLike, *, cache: dict | None = None, atlas: str | None = None,
               preload: bool | str = "auto", tr: float | str | None = None, normalization: str = "global",
               atlas_key: str = "data.atlas"):
    """Open the store of ``kind`` at ``path`` (the one place datamodules and tools open stores).

    Args:
        kind: ``roi``, ``volume``, ``frames``, ``grayordinate`` or ``brainmarks`` (a Brainmarks Arrow folder,
            opened as an ROI store).
        path: the file (``roi``) or folder.
        cache: per-process cache sizes (``data.cache``).
        atlas, preload: ``roi`` only. tr, normalization: ``frames`` only (frames record neither; ``tr`` is
            required). atlas_key: how ``atlas`` is set, for messages (``data.atlas``, ``--atlas``).

    Raises:
        ConfigError: an unknown kind, or frames without a numeric TR. DataError: as the store classes.
    """
    if kind == "roi":
        return ROIStore(path, atlas=atlas, preload=preload, cache=cache, atlas_key=atlas_key)
    if kind == "brainmarks":
        return BrainmarksStore(path, cache=cache)
    if kind == "volume":
        return VolumeStore(path, cache=cache)
    if kind == "grayordinate":
        return GrayordinateStore(path, cache=cache)
    if kind == "frames":
        if isinstance(tr, bool) or not isinstance(tr, (int, float)):
            raise ConfigError(f"frame folders ({path}) carry no TR: set data.tr=<seconds>")
        return FrameStore(path, tr=float(tr), normalization=normalization, cache=cache)
    raise ConfigError(f"store kind {kind!r} is not one of {(*KINDS, 'brainmarks')}")


__all__ = ["DEFAULT_CACHE", "KINDS", "LRUCache", "Store", "StoreBase", "detect_kind", "open_store",
           "wrong_kind_message"]
