"""Shared by the entry points: turning brainfm's errors into one clear line and exit status 2 (the only place
that does). Building objects with explained errors: :mod:`brainfm.instantiate`; console tidying:
:mod:`brainfm.logs`."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

from brainfm.errors import brainfm_cause

#: entry points whose ``data`` node starts empty (``data: {}``): a data key is added with ``+data.<key>=``
PLUS_DATA_PROGS = ("brainfm-evaluate", "brainfm-extract", "brainfm-predict", "brainfm-interpret")
_DATA_FIX = re.compile(r"(?<![+\w.])data\.(?=[A-Za-z_][\w.]*=)")


#: command-line tools that take a data setting as an option: the store messages' ``data.<key>=`` fix, as typed there
OPTION_FIXES = {"brainfm-data": {"atlas": "--atlas ", "tr": "--tr "},
                "brainfm-preprocess": {"tr": "--tr "}}


def message_for(prog: str, error: BaseException) -> str:
    """The one line ``prog`` prints for ``error``: its message, with its ``data.<key>=`` fixes written as they
    work in ``prog``: ``+data.<key>=`` for the entry points whose ``data`` node starts empty
    (:data:`PLUS_DATA_PROGS`: their data keys are added to the run's data config, so Hydra needs the ``+``),
    ``--atlas <name>`` for the command-line tools (:data:`OPTION_FIXES`)."""
    text = str(error)
    for key, option in OPTION_FIXES.get(prog, {}).items():
        text = re.sub(rf"(?<![+\w.])data\.{key}=", option, text)
    if prog in PLUS_DATA_PROGS:
        text = _DATA_FIX.sub("+data.", text)
    return text


@contextmanager
def exit_on_brainfm_error(prog: str):
    """Turn a BrainfmError (also when a library wrapped it) into ``<prog>: error: <message>`` on stderr and
    exit status 2; other exceptions propagate."""
    try:
        yield
    except Exception as exc:
        cause = brainfm_cause(exc)
        if cause is None:
            raise
        print(f"{prog}: error: {message_for(prog, cause)}", file=sys.stderr)
        sys.exit(2)
