"""``python -m brainfm.runs consolidate <checkpoint> <out.ckpt> [--weights-only]``: any brainfm checkpoint
(FSDP2/DCP or DeepSpeed directory, file, run directory) -> one Lightning checkpoint file without optimizer
state (:func:`brainfm.runs.consolidate`).

An entry point (run as a script, imported by no module: in the entry-point layer with ``cli/``). A brainfm error
becomes ``python -m brainfm.runs: error: <message>`` and exit status 2, as in the ``brainfm-*`` commands
(:func:`brainfm.cli.common.exit_on_brainfm_error`).
"""

from __future__ import annotations

import argparse

from brainfm.cli.common import exit_on_brainfm_error
from brainfm.runs.checkpoint import consolidate


def main(argv: list[str] | None = None) -> None:
    """``python -m brainfm.runs consolidate <checkpoint> <out.ckpt> [--weights-only]``."""
    parser = argparse.ArgumentParser(prog="python -m brainfm.runs", description="checkpoint utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="any checkpoint (FSDP2/DCP or DeepSpeed directory, file, run dir) -> "
                                           "one Lightning checkpoint file without optimizer state")
    p.add_argument("checkpoint", help="DCP or DeepSpeed checkpoint directory, checkpoint file, or run directory")
    p.add_argument("output_file")
    p.add_argument("--weights-only", action="store_true",
                   help="keep only weights, hyper-parameters and brainfm's metadata (no loop/callback/scheduler state)")
    args = parser.parse_args(argv)
    with exit_on_brainfm_error(parser.prog):
        print(f"wrote {consolidate(args.checkpoint, args.output_file, weights_only=args.weights_only)}")


if __name__ == "__main__":
    main()
