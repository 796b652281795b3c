"""``python -m brainfm.models.convert <format> <src> <dst>``: a reference project's checkpoint ->
a brainfm state dict (``.safetensors`` or ``.pt``), through :mod:`brainfm.checkpoints` (read with
``weights_only=True``; the per-family adapters live with their models).

Formats: ``swift`` (a SwiFT Lightning checkpoint -> the Swin4D backbone, which loads unchanged into
``model=swin4d_v7`` with the checkpoint's sizes); ``lfb`` (Thomas et al.'s released GPT/CSM or
Sequence-BERT ``pytorch_model.bin`` -> a SequenceTransformer and its task heads; also writes
``<dst>.yaml``, the model config the weights need: ``brainfm-train experiment=lfb_gpt
task.init_from=<dst>``); see ``--help`` for the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from brainfm.checkpoints import ADAPTERS, convert

    parser = argparse.ArgumentParser(prog="python -m brainfm.models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    for name, adapter in ADAPTERS.items():
        p = sub.add_parser(name, help=adapter.description)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        if name == "lfb":
            p.add_argument("--n-heads", type=int, default=None,
                           help="attention heads (not in the weights; default d_model // 64: 12 for the released 768)")
    args = parser.parse_args(argv)
    state, left_out = convert(args.kind, args.src, args.dst)
    print(f"wrote {len(state)} tensors to {args.dst}; left out {len(left_out)}: {sorted(left_out)[:6]}")
    if args.kind == "lfb":
        print(f"wrote {write_lfb_config(state, args.src, args.dst, args.n_heads)}")


def write_lfb_config(state: dict, src: Path, dst: Path, n_heads: int | None = None) -> Path:
    """Write ``<dst>.yaml`` (atomically): the ``model`` config of converted learning-from-brains weights
    (:func:`brainfm.models.sequence.lfb_model_config`) with the command line that uses them."""
    from omegaconf import OmegaConf

    from brainfm.models.sequence import lfb_model_config

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
            f"# by python -m brainfm.models.convert lfb (task={cfg['task']}). Train or fine-tune from it with\n"
            f"#   brainfm-train experiment={experiment}{sizes} task.init_from={dst} data.path=<ROI store>\n"
            + OmegaConf.to_yaml(OmegaConf.create({"model": m})))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    main()
