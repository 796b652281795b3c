"""Which kind of store a path holds, and what to say when a recipe is given another kind.

Below every store module (they import this one, never the reverse): the layout names written into
each run's ``meta.json`` live here, so recognising a folder needs no store class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pyarrow.parquet as pq

from brainfm.data.stores.index import INDEX
from brainfm.errors import DataError

#: store kinds with a brainfm layout (``brainmarks`` is read as ``roi``)
KINDS = ("roi", "volume", "frames", "grayordinate")
#: ``meta.json`` ``layout`` of a volume store's run
VOLUME_LAYOUT = "brainfm-volume-run"
#: ``meta.json`` ``layout`` of a grayordinate store's run
GRAYORDINATE_LAYOUT = "brainfm-grayordinate-run"
#: each run's metadata file in a run-folder store
META = "meta.json"


def detect_kind(path: str | os.PathLike) -> str:
    """The kind of the store at ``path``: ``roi`` (an HDF5 file), or for a folder ``brainmarks`` (Brainmarks'
    ``train/``, ``validation/``, ``test/`` Arrow splits), else the kind its run index records, else the layout
    of its first ``meta.json`` (``volume``/``grayordinate``), else ``frames`` (``img/<subject>/frame_<t>.pt``).

    Raises:
        DataError: nothing at ``path``, or a folder in none of these layouts.
    """
    path = Path(path)
    if path.is_file():
        return "roi"
    if not path.is_dir():
        raise DataError(f"{path} does not exist")
    if all((path / split).is_dir() for split in ("train", "validation", "test")):
        return "brainmarks"
    for index in (path / INDEX, path / "img" / INDEX):
        if index.is_file():
            kind = (pq.read_schema(index).metadata or {}).get(b"brainfm_kind", b"").decode()
            if kind in KINDS:
                return kind
    meta = next(path.glob(f"*/*/{META}"), None)
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
        try:  # the grid of the first run (a hint: a store of mixed grids is refused where it is opened)
            found = json.loads(next(path.glob(f"*/*/{META}")).read_text())["shape"]
            shape, grid = "[" + ",".join(map(str, found)) + "]", ",".join(map(str, found))
        except Exception:  # the shape is only a hint
            pass
    recipe = RECIPE_OF_KIND.get(kind, "the recipe of that store kind (README, 'Configuration')").format(
        path=path, shape=shape, grid=grid)
    if kind == "roi":
        try:
            with h5py.File(path, "r") as f:
                atlases = sorted(f["timeseries"].keys())
            recipe = recipe.replace("<atlas>", atlases[0] if len(atlases) == 1 else f"<one of {atlases}>")
        except Exception:  # the atlas is only a hint
            pass
    return (f"{path} is {MADE_BY.get(kind, kind + ' store')}, not {MADE_BY.get(wanted, wanted + ' store')}, which "
            f"this recipe reads. Fix: use {recipe}")
