"""Run preprocessing work items in a process pool with a progress bar."""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed


def _pool(workers: int) -> ProcessPoolExecutor:
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))


def _run_all(fn, items: list, workers: int, progress: bool, desc: str, fail_fast: bool) -> list:
    from tqdm.auto import tqdm

    results: list = [None] * len(items)
    import sys

    tty = sys.stderr.isatty()  # off a terminal (SLURM logs): one line every 30 s, not a live bar
    bar = tqdm(total=len(items), desc=desc, unit="run", disable=not progress or not items,
               mininterval=0.1 if tty else 30.0)
    try:
        if workers <= 1 or len(items) <= 1:
            for i, args in enumerate(items):
                results[i] = fn(*args)
                bar.update(1)
                if fail_fast and getattr(results[i], "status", None) == "failed":
                    break
        else:
            with _pool(min(workers, len(items))) as pool:
                futures = {pool.submit(fn, *args): i for i, args in enumerate(items)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
                    if fail_fast and getattr(results[futures[fut]], "status", None) == "failed":
                        for f in futures:
                            f.cancel()
                        break
    finally:
        bar.close()
    return results


