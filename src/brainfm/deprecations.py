"""Old spellings brainfm still reads: the one place they are named.

brainfm spells ``normalization`` one way everywhere (config key ``data.normalization``, CLI flags,
store metadata, index columns; American spelling, as PyTorch, MONAI and scikit-learn). Stores
written before 2026-12 carry the British key in each run's ``meta.json`` and as an
``index.parquet`` column, and scripts may still pass the old ``brainfm-preprocess`` flags; both are
read through the functions below, which rename on the way in and never rewrite a user's files.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

#: stored key (``meta.json``, index column) -> current key
RENAMED_KEYS: dict[str, str] = {"normalisation": "normalization"}

#: command-line flag -> current flag (accepted with a notice on stderr)
RENAMED_FLAGS: dict[str, str] = {
    "--normalisation": "--normalization",
    "--normalisation-applied": "--normalization-applied",
}


def current_keys(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` with every key of :data:`RENAMED_KEYS` under its current name (a current key wins
    when a file holds both). A new dict; nothing is written back."""
    out = dict(meta)
    for old, new in RENAMED_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def current_columns(table):
    """A ``pyarrow.Table`` with every column of :data:`RENAMED_KEYS` under its current name."""
    names = [RENAMED_KEYS.get(n, n) if RENAMED_KEYS.get(n, n) not in table.column_names else n
             for n in table.column_names]
    return table if names == table.column_names else table.rename_columns(names)


def current_flags(argv: Sequence[str], prog: str) -> list[str]:
    """``argv`` with each old flag of :data:`RENAMED_FLAGS` (``--old`` or ``--old=value``) replaced
    by its current spelling; one notice per old flag on stderr, naming the one to type instead."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        new = RENAMED_FLAGS.get(flag)
        if new is None:
            out.append(arg)
            continue
        print(f"{prog}: note: {flag} is spelled {new} now (the old flag still works); type {new}",
              file=sys.stderr)
        out.append(new + eq + value)
    return out
