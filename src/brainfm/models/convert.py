"""``python -m brainfm.models.convert <format> <src> <dst>``: a reference project's checkpoint ->
a brainfm state dict (``.safetensors`` or ``.pt``), through :mod:`brainfm.checkpoints` (read with
``weights_only=True``; the per-family adapters live with their models).

Formats: ``swift`` (a SwiFT Lightning checkpoint -> the Swin4D backbone, which loads unchanged into
``model=swin4d_v7`` with the checkpoint's sizes); see ``--help`` for the others.
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
    args = parser.parse_args(argv)
    state, left_out = convert(args.kind, args.src, args.dst)
    print(f"wrote {len(state)} tensors to {args.dst}; left out {len(left_out)}: {sorted(left_out)[:6]}")


if __name__ == "__main__":
    main()
