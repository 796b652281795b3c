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
        from brainfm.data.stores.roi import ROIStore

        return ROIStore(path, atlas=atlas, preload=preload, cache=cache, atlas_key=atlas_key)
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
        return FrameStore(path, tr=float(tr), normalization=normalization, cache=cache)
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


#: what reads each store kind: the recipe (and model family) to name when a store of one kind is given to another
RECIPE_OF_KIND = {
    "roi": "an ROI recipe and a sequence model: data=hcp_rest_roi data.path={path} data.atlas=<atlas> data.n_rois=null "
           "data.tr=null (e.g. experiment=demo or experiment=gpt)",
    "volume": "the volume recipe and a Swin4D of the store's grid: data=volumes data.path={path} data.shape={shape} "
              "model=swin4d_v9 task=simmim model.img_size=[{grid},20] (20: data.window.length, TRs per clip; "
              "experiment=swift_v2_simmim data.path={path} is the SwiFT v2 preset)",
    "frames": "the volume recipe on SwiFT frame folders: data=volumes data.layout=frames data.path={path} "
              "data.tr=<seconds> (e.g. experiment=swift_v2_simmim)",
    "grayordinate": "the grayordinate recipe: data=r2t_grayordinate data.path={path} (experiment=r2t_hcp)",
    "brainmarks": "the Brainmarks recipe: data=brainmarks data.path={path}",
}
#: how each kind is made, for messages
MADE_BY = {"roi": "an ROI HDF5 file", "volume": "a volume store (brainfm-preprocess volumes)",
           "frames": "SwiFT/TFF frame folders (img/<subject>/frame_<t>.pt)",
           "grayordinate": "a grayordinate store (CIFTI dtseries)", "brainmarks": "a Brainmarks Arrow data set"}


def wrong_kind_message(path: str | os.PathLike, wanted: str) -> str | None:
    """A message for a store of another kind than ``wanted`` at ``path`` (it exists, it is just not what the
    recipe reads): what it is and the recipe that reads it. None when ``path`` does not exist or its kind is
    unknown."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return None
    try:
        kind = detect_kind(path)
    except Exception:  # an unreadable folder: not recognised, the caller's own message applies
        return None
    if kind == wanted:
        return None
    shape, grid = "[X,Y,Z]", "X,Y,Z"
    if kind == "volume":
        try:
            from brainfm.data.stores.volume import VolumeStore

            found = VolumeStore(path).frame_shape
            if found is not None:
                shape, grid = "[" + ",".join(map(str, found)) + "]", ",".join(map(str, found))
        except Exception:  # the shape is only a hint
            pass
    recipe = RECIPE_OF_KIND.get(kind, "the recipe of that store kind (README, 'Configuration')").format(
        path=path, shape=shape, grid=grid)
    if kind == "roi":
        try:
            import h5py

            with h5py.File(path, "r") as f:
                atlases = sorted(f["timeseries"].keys())
            recipe = recipe.replace("<atlas>", atlases[0] if len(atlases) == 1 else f"<one of {atlases}>")
        except Exception:  # the atlas is only a hint
            pass
    return (f"{path} is {MADE_BY.get(kind, kind + ' store')}, not {MADE_BY.get(wanted, wanted + ' store')}, which "
            f"this recipe reads. Fix: use {recipe}")


__all__ = ["DEFAULT_CACHE", "KINDS", "LRUCache", "Store", "StoreBase", "detect_kind", "open_store",
           "wrong_kind_message"]
