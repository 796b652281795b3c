"""The one place where weights are read, converted and written.

- :func:`read_checkpoint`: a whole ``torch.save`` file (a Lightning checkpoint with its
  hyper-parameters, a DCP ``meta.pt``), ``weights_only=True``, optionally memory-mapped.
- :func:`read_state_dict`: a ``.safetensors`` file, a ``torch.save`` state dict, a Lightning
  checkpoint (its ``state_dict``), a Hugging Face ``pytorch_model.bin`` or an FSDP2 sharded
  (torch.distributed.checkpoint) directory, always with ``torch.load(weights_only=True)`` or DCP's
  reader: no file runs code when it is read.
- :func:`checkpoint_format` and :func:`read_sharded_state_dict`: what a checkpoint path is (one file,
  a DCP directory, a DeepSpeed directory) and the full weights of a DCP directory without a process group.
- :func:`write_state_dict`: ``.safetensors`` (or ``torch.save`` for other suffixes), atomically (a
  temporary file renamed into place: a killed job never leaves half a file), with the data contract the
  weights need where one is known (converted SwiFT weights: ``LAS``); :func:`read_data_meta` reads a file's.
- :func:`load_backbone`: ``task.init_from`` of every task (a brainfm checkpoint's ``model.*``
  weights, also FSDP2's sharded ``last.ckpt`` directory; converted weights, a plain state dict) into a backbone, with the keys a task may leave
  at their initialisation named by the caller.
- Foreign checkpoints: a per-family *adapter* (a pure function on state dicts that lives with its
  model, as timm's ``checkpoint_filter_fn`` and torchtitan's ``StateDictAdapter``) maps the
  reference project's keys to brainfm's; :data:`brainfm.models.convert.ADAPTERS` names them for
  ``brainfm-convert <name> <src> <dst>`` (:func:`brainfm.models.convert.convert`),
  which reads and writes through this module (this module imports no model).

Raises :class:`brainfm.errors.CheckpointError` naming the file for anything that does not load.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from brainfm.errors import CheckpointError, ConfigError
from brainfm.io import atomic_path

StateDict = dict[str, torch.Tensor]


#: Lightning's metadata file in a DCP checkpoint directory (lightning.fabric.utilities.load._METADATA_FILENAME)
DCP_META = "meta.pt"
#: torch.distributed.checkpoint's index, written last by the coordinator rank
DCP_INDEX = ".metadata"
#: the command that turns a sharded checkpoint directory into one file (:func:`brainfm.runs.consolidate`)
CONSOLIDATE = "python -m brainfm.runs consolidate"


def checkpoint_format(path: str | Path) -> str | None:
    """``"file"``, ``"dcp"`` (a complete torch.distributed.checkpoint directory: ``.metadata`` and
    Lightning's ``meta.pt``), ``"deepspeed"`` (a directory with a ``latest`` file) or ``None``."""
    path = Path(path)
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / DCP_META).is_file() and (path / DCP_INDEX).is_file():
            return "dcp"
        if (path / "latest").is_file():
            return "deepspeed"
    return None


def read_sharded_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model ``state_dict`` of a DCP checkpoint directory, read in this one
    process without a process group (``torch.distributed.checkpoint.load(no_dist=True)``): every
    tensor at its global shape, keys as a DDP run's (``model.…``); optimizer state is not read.
    Needs host memory for the weights (4 bytes per fp32 parameter), not for the optimizer.

    Raises:
        CheckpointError: not a complete DCP checkpoint directory, or one without a ``state_dict``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_format(checkpoint_dir) != "dcp":
        raise CheckpointError(f"{checkpoint_dir} is not a complete torch.distributed.checkpoint directory "
                              f"(it needs {DCP_INDEX} and {DCP_META})")
    metadata = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata()
    weights: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(key, tuple(key.split(".", 1)))
        if len(where) < 2 or where[0] != "state_dict":
            continue  # optimizer_<i>.… : not needed for weights
        if not isinstance(item, TensorStorageMetadata):
            raise CheckpointError(f"{checkpoint_dir}: state_dict entry {key} is not a tensor; brainfm's models have "
                                  "tensor-only state dicts")
        weights[".".join(str(p) for p in where[1:])] = torch.empty(item.size, dtype=item.properties.dtype)
    if not weights:
        raise CheckpointError(f"{checkpoint_dir} holds no model state_dict (was it written by brainfm-train?)")
    target = {"state_dict": weights}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": intended
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to load in a single process.*")
        dcp.load(target, checkpoint_id=str(checkpoint_dir), no_dist=True)
    return target["state_dict"]


def read_checkpoint(path: str | Path, *, mmap: bool = False, safe_globals: Sequence = ()) -> dict:
    """The whole object ``torch.save`` wrote to ``path`` (a Lightning checkpoint with its
    hyper-parameters, a DCP ``meta.pt``, a state dict), with ``torch.load(weights_only=True)`` on
    the CPU; ``mmap`` memory-maps its tensors (a 3.2B-parameter checkpoint is not read into memory
    to look at its metadata). ``safe_globals``: see :func:`read_state_dict`.

    Raises:
        CheckpointError: no such file, or a file that does not load with ``weights_only=True`` (a
            truncated file, a pickle with code: re-save its state dict where it was written).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(
            f"{path} does not load with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
            "If it is truncated, take an earlier checkpoint; if it pickles more than tensors (e.g. argparse "
            "namespaces), re-save its state_dict as safetensors in the environment that wrote it") from exc


def read_state_dict(path: str | Path, *, prefix: str | None = None, safe_globals: Sequence = ()) -> StateDict:
    """The tensors of ``path`` (``.safetensors``, a state dict, a Lightning/brainfm checkpoint's
    ``state_dict``, a ``pytorch_model.bin``, or an FSDP2 sharded checkpoint directory read at full
    shape by :func:`read_sharded_state_dict`), loaded on the CPU without running code.

    ``prefix``: keep only keys starting with it, prefix removed (e.g. ``"model."`` for a backbone in
    a Lightning checkpoint); when no key has it, the state is returned unchanged. ``safe_globals``:
    classes the file's pickled metadata may hold besides tensors (``torch.serialization.safe_globals``
    entries, e.g. ``argparse.Namespace``); nothing else is ever unpickled.

    Raises:
        CheckpointError: no such file, a file that does not load with ``weights_only=True`` (e.g. a
            pickle with code: convert it where it was written), no tensors in it, an incomplete
            checkpoint directory, or a DeepSpeed directory (the message names the consolidate command).
    """
    path = Path(path)
    form = checkpoint_format(path)
    if form == "deepspeed":
        raise CheckpointError(
            f"{path} is a DeepSpeed (sharded) checkpoint directory; its weights are read from one file. Fix: "
            f"`{CONSOLIDATE} {path} {path.with_suffix('')}-consolidated.ckpt` and pass that file")
    if form is None and path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        hint = f" (a run directory: its checkpoint is {last})" if last.exists() else ""
        raise CheckpointError(f"{path} is a directory but no complete checkpoint (a sharded FSDP2/DCP checkpoint has "
                              f"{DCP_INDEX} and {DCP_META}; a DeepSpeed one a 'latest' file); give a checkpoint "
                              f"file{hint}")
    if form is None:
        raise CheckpointError(f"{path}: no such file")
    if form == "dcp":  # FSDP2's sharded last.ckpt: read in this one process, at full shape
        state = read_sharded_state_dict(path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    else:
        state = read_checkpoint(path, safe_globals=safe_globals)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        elif isinstance(state, Mapping) and isinstance(state.get("model_state_dict"), Mapping):
            state = state["model_state_dict"]  # the reference projects' own checkpoints (Brain-Semantoks)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


#: the safetensors metadata key of a converted file's data contract (JSON of its ``data_meta``)
DATA_META_KEY = "brainfm_data_meta"


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | Path, data_meta: Mapping | None = None) -> Path:
    """Write ``state`` to ``path`` atomically: ``.safetensors`` (contiguous CPU copies) or, for any
    other suffix, ``torch.save``. Returns the path.

    ``data_meta``: the data contract the weights need (e.g. ``{"orientation": "LAS"}`` for SwiFT's), plain
    values, read back by :func:`read_data_meta`: JSON in the safetensors metadata (:data:`DATA_META_KEY`); with
    ``torch.save``, the file holds ``{"state_dict": state, "data_meta": data_meta}`` (Lightning's layout, which
    :func:`read_state_dict` reads)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = None if data_meta is None else {DATA_META_KEY: json.dumps(dict(data_meta))}
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        else:
            torch.save(dict(state) if data_meta is None else {"state_dict": dict(state), "data_meta": dict(data_meta)},
                       tmp)
    return path


def read_data_meta(path: str | Path) -> dict | None:
    """The data contract (``data_meta``) a weight file records, without reading its tensors: a brainfm checkpoint's
    ``hyper_parameters["data_meta"]`` (a file, or Lightning's ``meta.pt`` of an FSDP2 sharded directory), or what
    :func:`write_state_dict` stored with converted weights; None where the file records none (foreign or plain
    state dicts, DeepSpeed directories).

    Raises:
        CheckpointError: as :func:`read_checkpoint` / a safetensors file that does not open.
    """
    path = Path(path)
    form = checkpoint_format(path)
    if form == "dcp":
        path = path / DCP_META
    elif form != "file":
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(DATA_META_KEY)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        return json.loads(text) if text else None
    try:  # memory-mapped: a large checkpoint's tensors are not read to look at its hyper-parameters
        obj = read_checkpoint(path, mmap=True)
    except CheckpointError:  # a file in torch's legacy (non-zip) format cannot be memory-mapped
        obj = read_checkpoint(path)
    if not isinstance(obj, Mapping):
        return None
    meta = (obj.get("hyper_parameters") or {}).get("data_meta") if isinstance(obj.get("hyper_parameters"), Mapping) \
        else None
    meta = meta if meta is not None else obj.get("data_meta")
    return dict(meta) if isinstance(meta, Mapping) else None


def load_backbone(model: torch.nn.Module, path: str | Path, *, may_be_missing: Sequence[str] = (),
                  key: str = "task.init_from") -> list[str]:
    """Initialise a backbone ``model`` from ``path`` (:func:`read_state_dict` with prefix
    ``model.``: a brainfm checkpoint's backbone, weights converted by ``brainfm.models.convert``, a
    plain state dict). Keys of the model starting with one of ``may_be_missing`` may be absent from
    the file (e.g. TFF's transformer after its phase 1, a final norm the pretraining did not have)
    and keep their initialisation; every other key must be there with its shape. Returns the keys
    left at their initialisation.

    Raises:
        CheckpointError: the file does not load (:func:`read_state_dict`).
        ConfigError: (naming ``key`` and the file) its keys or shapes do not fit the model: the model
            config must match the pretrained one.
    """
    state = read_state_dict(path, prefix="model.")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    required = [k for k in missing if not k.startswith(tuple(may_be_missing))]
    if wrong or unexpected or required:
        raise ConfigError(
            f"{key}={path} does not fit the model {type(model).__name__}: "
            + "; ".join(f"{what} {items[:5]}" for what, items in
                        (("shapes differ:", wrong), ("missing", required), ("unexpected", unexpected)) if items)
            + ". The model config (sizes, version, n_rois) must match the pretrained one; foreign weights are "
            "converted first (brainfm-convert --help)")
    model.load_state_dict(state, strict=False)
    return missing


class _HParams(dict):
    """Stands in for Lightning's ``AttributeDict`` when a checkpoint's hyper-parameters are read."""


#: what a (PyTorch) Lightning checkpoint of the reference projects pickles besides tensors
LIGHTNING_SAFE_GLOBALS = (
    argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
    (_HParams, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_HParams, "lightning.fabric.utilities.data.AttributeDict"),
    (_HParams, "lightning_fabric.utilities.data.AttributeDict"),
)
