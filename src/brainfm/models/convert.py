"""``brainfm-convert <format> <src> <dst>`` (or ``brainfm-convert``): a reference project's checkpoint ->
a brainfm state dict (``.safetensors`` or ``.pt``), through :mod:`brainfm.checkpoints` (read with
``weights_only=True``; the per-family adapters live with their models, :data:`ADAPTERS` names them here).

Formats: ``swift`` (a SwiFT Lightning checkpoint -> the Swin4D backbone, which loads unchanged into
``model=swin4d_v7`` with the checkpoint's sizes; the file records the ``LAS`` orientation SwiFT was trained on,
so a run that starts from it refuses a store of another orientation); ``lfb`` (Thomas et al.'s released GPT/CSM or
Sequence-BERT ``pytorch_model.bin`` -> a SequenceTransformer and its task heads; also writes
``<dst>.yaml``, the model config the weights need: ``brainfm-train experiment=lfb_gpt
task.init_from=<dst>``); see ``--help`` for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from brainfm.checkpoints import LIGHTNING_SAFE_GLOBALS, StateDict, read_state_dict, write_state_dict
from brainfm.errors import CheckpointError
from brainfm.io import atomic_write_text
from brainfm.models.semantoks import semantoks_checkpoint_filter
from brainfm.models.sequence import lfb_checkpoint_filter, lfb_model_config
from brainfm.models.swin4d import swift_checkpoint_filter


@dataclass(frozen=True)
class Adapter:
    """A foreign checkpoint format: ``adapt(state) -> (brainfm_state, left_out)`` maps the reference
    keys to the brainfm model's and returns what it does not carry over (heads, optimizer). ``data_meta``: the
    data contract the weights need, written with them (:func:`brainfm.checkpoints.write_state_dict`) and checked
    when a run starts from them (``task.init_from``)."""

    name: str
    description: str
    adapt: Callable[[StateDict], tuple[StateDict, StateDict]]
    prefix: str | None = None
    safe_globals: tuple = ()
    data_meta: dict | None = None


#: name -> adapter, for ``brainfm-convert <name>``
ADAPTERS: dict[str, Adapter] = {
    # SwiFT was trained on FSL's LAS volumes (HCP/UKB/ABCD minimal preprocessing; Kim et al., NeurIPS 2023)
    "swift": Adapter("swift", "SwiFT Lightning checkpoint -> Swin4D backbone (model=swin4d_v7 with its sizes; "
                     "records LAS: data must be preprocessed with --orientation LAS)",
                     swift_checkpoint_filter, safe_globals=LIGHTNING_SAFE_GLOBALS, data_meta={"orientation": "LAS"}),
    "lfb": Adapter("lfb", "Thomas et al. (learning-from-brains) GPT/CSM or Sequence-BERT pytorch_model.bin -> "
                   "SequenceTransformer + task heads (experiment=lfb_gpt / lfb_seq_bert; writes <dst>.yaml)",
                   lfb_checkpoint_filter),
    "semantoks": Adapter("semantoks", "Brain-Semantoks checkpoint (model_state_dict: SimDINOModel, teacher encoder) or "
                         "CNN_TF state -> SemantoksEncoder (model=semantoks model.qkv_bias=false, the reference's sizes)",
                         semantoks_checkpoint_filter),
}


def convert(name: str, src: str | Path, dst: str | Path | None = None) -> tuple[StateDict, StateDict]:
    """Read ``src``, adapt it with :data:`ADAPTERS` ``[name]`` and write the brainfm state to ``dst``.

    Returns ``(brainfm_state, left_out)``.

    Raises:
        CheckpointError: unknown adapter, unreadable file, or keys the adapter does not recognise.
    """
    if name not in ADAPTERS:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known: {sorted(ADAPTERS)}")
    adapter = ADAPTERS[name]
    state = read_state_dict(src, prefix=adapter.prefix, safe_globals=adapter.safe_globals)
    try:
        out, left_out = adapter.adapt(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from exc
    if dst is not None:
        write_state_dict(out, dst, data_meta=adapter.data_meta)
    return out, left_out


def write_lfb_config(state: dict, src: Path, dst: Path, n_heads: int | None = None) -> Path:
    """Write ``<dst>.yaml`` (atomically): the ``model`` config of converted learning-from-brains weights
    (:func:`brainfm.models.sequence.lfb_model_config`) with the command line that uses them."""
    from omegaconf import OmegaConf

    cfg = lfb_model_config(state, n_heads=n_heads)
    experiment = "lfb_gpt" if cfg["task"] == "csm" else "lfb_seq_bert"
    path = Path(dst).with_suffix(".yaml")
    if path == Path(dst):  # weights written as .yaml: keep them
        path = path.with_name(f"{path.name}.model.yaml")
    what = "GPT (CSM)" if cfg["task"] == "csm" else "Sequence-BERT"
    m = cfg["model"]
    # experiment=lfb_* is the released size (768 x 4 x 12 heads, 1024 ROIs); other sizes are overrides
    sizes = "".join(f" model.{k}={m[k]}" for k, released in (("d_model", 768), ("depth", 4), ("n_heads", 12))
                    if m[k] != released) + ("" if m["n_rois"] == 1024 else f" data.n_rois={m['n_rois']}")
    text = (f"# Model config of {Path(dst).name}: Thomas et al.'s {what} converted from {src}\n"
            f"# by brainfm-convert lfb (task={cfg['task']}). Train or fine-tune from it with\n"
            f"#   brainfm-train experiment={experiment}{sizes} task.init_from={dst} data.path=<ROI store>\n"
            + OmegaConf.to_yaml(OmegaConf.create({"model": m})))
    return atomic_write_text(path, text)


if __name__ == "__main__":  # an entry point: `brainfm-convert` is the brainfm-convert command
    from brainfm.cli.convert import main

    main()
