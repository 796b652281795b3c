"""``python -m brainfm.runs consolidate <checkpoint> <out.ckpt> [--weights-only]``: an entry point (run as a
script, imported by nothing); the command line lives in :mod:`brainfm.cli.consolidate`, the one layer that
turns errors into exit codes."""

from brainfm.cli.consolidate import main

if __name__ == "__main__":
    main()
