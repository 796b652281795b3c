"""Converting checkpoints of the reference implementations into brainfm state dicts.

``python -m brainfm.models.convert swift <swift.ckpt> <backbone.safetensors>``: a SwiFT Lightning
checkpoint (``state_dict`` keys ``model.<SwinTransformer4D key>`` plus its heads) -> the backbone's
state dict, which loads unchanged into ``model=swin4d_v7`` with the checkpoint's sizes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from brainfm.errors import CheckpointError


def convert_swift_checkpoint(src: str | Path, dst: str | Path | None = None) -> tuple[dict, dict]:
    """Split a SwiFT Lightning checkpoint into backbone and head state dicts; write the backbone to
    ``dst`` (``.safetensors`` or ``.pt``) if given.

    SwiFT's checkpoints pickle their argparse hyper-parameters, so they are loaded with
    ``weights_only=False``: only convert checkpoints from a source you trust.

    Raises:
        CheckpointError: unreadable file, or no ``model.``-prefixed keys.
    """
    src = Path(src)
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{src} cannot be loaded as a SwiFT checkpoint ({type(exc).__name__}: {exc})") from exc
    state = ckpt.get("state_dict", ckpt)
    backbone = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    heads = {k: v for k, v in state.items() if not k.startswith("model.")}
    if not backbone:
        raise CheckpointError(f"{src} has no 'model.'-prefixed keys; is it a SwiFT Lightning checkpoint? keys: {list(state)[:5]}")
    if dst is not None:
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in backbone.items()}, str(tmp))
        else:
            torch.save(backbone, tmp)
        tmp.replace(dst)
    return backbone, heads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m brainfm.models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("swift", help="SwiFT Lightning checkpoint -> Swin4D backbone state dict")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    backbone, heads = convert_swift_checkpoint(args.src, args.dst)
    print(f"wrote {len(backbone)} backbone tensors to {args.dst}; left out {len(heads)} head tensors: {sorted(heads)[:6]}")


if __name__ == "__main__":
    main()
