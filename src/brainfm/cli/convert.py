"""``brainfm-convert <format> <src> <dst>`` (also ``brainfm-convert``): a reference project's
checkpoint -> a brainfm state dict (:func:`brainfm.models.convert.convert`; the formats are
:data:`brainfm.models.convert.ADAPTERS`). Exit status 2 for a brainfm error (one line with its fix)."""

from __future__ import annotations

import argparse
from pathlib import Path

from brainfm.cli.common import exit_on_brainfm_error

# brainfm's library (torch, Lightning) is imported inside the command's functions, not here: `--help` and a
# config error then return in under a second instead of 5-13 s (python -X importtime -m brainfm.cli.train --help, 2 busy
# cores). The entry points are the one place where brainfm imports sit in functions (docs/architecture.md).


def main(argv: list[str] | None = None) -> None:
    from brainfm.models import convert as conversion

    parser = argparse.ArgumentParser(prog="brainfm-convert", description=conversion.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    for name, adapter in conversion.ADAPTERS.items():
        p = sub.add_parser(name, help=adapter.description)
        p.add_argument("src", type=Path)
        p.add_argument("dst", type=Path)
        if name == "lfb":
            p.add_argument("--n-heads", type=int, default=None,
                           help="attention heads (not in the weights; default d_model // 64: 12 for the released 768)")
    args = parser.parse_args(argv)
    with exit_on_brainfm_error(parser.prog):
        state, left_out = conversion.convert(args.kind, args.src, args.dst)
        print(f"wrote {len(state)} tensors to {args.dst}; left out {len(left_out)}: {sorted(left_out)[:6]}")
        if args.kind == "lfb":
            print(f"wrote {conversion.write_lfb_config(state, args.src, args.dst, args.n_heads)}")


if __name__ == "__main__":
    main()
