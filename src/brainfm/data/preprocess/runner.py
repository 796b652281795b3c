"""Run preprocessing work items in a process pool with a progress bar, and split them into shards.

Sharding (``brainfm-preprocess ... --shard I/N``): the runs of an input, sorted by (subject, run),
are split round-robin into ``N`` shards and one process does shard ``I`` (0-based: ``runs[I::N]``).
Without ``--shard`` a SLURM job array gives the shard: ``SLURM_ARRAY_TASK_ID`` (minus
``SLURM_ARRAY_TASK_MIN``, divided by ``SLURM_ARRAY_TASK_STEP``) of ``SLURM_ARRAY_TASK_COUNT``; outside
an array, ``0/1`` (every run).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from brainfm.errors import ConfigError

T = TypeVar("T")


def _pool(workers: int) -> ProcessPoolExecutor:
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))


def run_all(fn, items: list, workers: int, progress: bool, desc: str, fail_fast: bool,
             on_result: Callable[[int, object], None] | None = None) -> list:
    """``[fn(*args) for args in items]`` in ``workers`` processes (forked), with a progress bar.

    ``on_result(i, result)`` is called in this process as each item finishes (any order), e.g. to
    add a written run to the store's index. With ``fail_fast`` the remaining items are cancelled
    after the first result whose ``status`` is ``failed`` (their results stay None).
    """
    from tqdm.auto import tqdm

    results: list = [None] * len(items)
    import sys

    tty = sys.stderr.isatty()  # off a terminal (SLURM logs): one line every 30 s, not a live bar
    bar = tqdm(total=len(items), desc=desc, unit="run", disable=not progress or not items,
               mininterval=0.1 if tty else 30.0)

    def done(i: int, result) -> bool:
        results[i] = result
        bar.update(1)
        if on_result is not None:
            on_result(i, result)
        return fail_fast and getattr(result, "status", None) == "failed"

    try:
        if workers <= 1 or len(items) <= 1:
            for i, args in enumerate(items):
                if done(i, fn(*args)):
                    break
        else:
            with _pool(min(workers, len(items))) as pool:
                futures = {pool.submit(fn, *args): i for i, args in enumerate(items)}
                for fut in as_completed(futures):
                    if done(futures[fut], fut.result()):
                        for f in futures:
                            f.cancel()
                        break
    finally:
        bar.close()
    return results


# -- shards ------------------------------------------------------------------------------------------------
def parse_shard(spec: str | Sequence[int] | None) -> tuple[int, int]:
    """``"I/N"`` (or ``(I, N)``; None: ``(0, 1)``) -> ``(I, N)`` with ``0 <= I < N``.

    Raises:
        ConfigError: not two integers ``I/N``, ``N < 1``, or ``I`` outside ``0 .. N-1``.
    """
    if spec is None:
        return 0, 1
    if isinstance(spec, str):
        parts = spec.strip().split("/")
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            raise ConfigError(f"--shard {spec!r} is not I/N (e.g. --shard 0/16: the first of 16 shards, 0-based)")
        i, n = (int(p) for p in parts)
    else:
        try:
            i, n = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ConfigError(f"shard {spec!r} is not a pair (I, N) of integers") from None
    if n < 1:
        raise ConfigError(f"--shard {i}/{n}: the number of shards must be at least 1")
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: the shard index is 0-based and must lie in 0..{n - 1}")
    return i, n


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The shard of this SLURM array task (module docstring), or ``(0, 1)`` outside a job array.

    Raises:
        ConfigError: non-integer SLURM variables, or an array whose task ids are not one contiguous
            range (e.g. ``--array=0-7,10``), naming the variables and the fix.
    """
    env = os.environ if environ is None else environ
    tid, count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if not tid or not count:
        return 0, 1
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
    values = {k: env.get(k) for k in names}
    try:
        i, n = int(tid), int(count)
        lo = int(values["SLURM_ARRAY_TASK_MIN"] or 0)
        step = int(values["SLURM_ARRAY_TASK_STEP"] or 1)
    except ValueError:
        raise ConfigError(f"SLURM array variables {values} are not integers. Fix: pass --shard I/N") from None
    seen = {k: v for k, v in values.items() if v is not None}
    if step < 1 or (i - lo) % step:
        raise ConfigError(f"SLURM array task {seen} does not map to a shard. Fix: --array=0-<N-1> "
                          "(one contiguous range), or pass --shard I/N")
    k = (i - lo) // step
    if not 0 <= k < n:
        raise ConfigError(f"SLURM array task {seen} gives shard {k}/{n}, outside 0..{n - 1}: the array is not one "
                          "contiguous range (e.g. --array=0-7,10). Fix: --array=0-<N-1>, or pass --shard I/N")
    return k, n


def resolve_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``--shard I/N`` when given, else the SLURM array task (:func:`shard_from_env`), else ``(0, 1)``.

    Raises:
        ConfigError: an invalid ``--shard`` or SLURM array (see :func:`parse_shard`, :func:`shard_from_env`).
    """
    return parse_shard(spec) if spec is not None else shard_from_env(environ)


def take_shard(items: Sequence[T], shard: tuple[int, int] | str | None) -> list[T]:
    """``items[I::N]`` of ``shard = (I, N)`` (validated by :func:`parse_shard`)."""
    i, n = parse_shard(shard)
    return list(items[i::n])
