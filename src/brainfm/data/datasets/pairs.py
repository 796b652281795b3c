"""Rest/task pairs of one subject (R2T-Net): roles of runs and the pair dataset."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from brainfm.errors import ConfigError

ROLES = ("rest", "task")


# -- roles and pairs ---------------------------------------------------------------------------------------
def assign_roles(run_ids: Sequence[str], rest_runs: Sequence[str], task_runs: Sequence[str] | None) -> list[str | None]:
    """``rest``, ``task`` or None (unused) for each run id, from shell patterns (case-insensitive).

    ``task_runs=None`` makes every run that is not rest a task run.

    Raises:
        ConfigError: a run id that matches both a rest and a task pattern.
    """
    def match(run: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(run.upper(), str(p).upper()) for p in patterns)

    roles: list[str | None] = []
    for run in run_ids:
        rest = match(run, rest_runs)
        task = (not rest) if task_runs is None else match(run, task_runs)
        if rest and task:
            raise ConfigError(f"run {run!r} matches both data.rest_runs={list(rest_runs)} and "
                              f"data.task_runs={list(task_runs or [])}; make the patterns exclusive")
        roles.append("rest" if rest else "task" if task else None)
    return roles


class R2TPairDataset(Dataset):
    """Pairs ``(rest window, task window)`` of one subject (R2T-Net's paired dataset).

    Item ``i`` belongs to subject ``subjects[i % len(subjects)]`` (so ``pairs_per_subject`` items
    per subject and epoch). Indexing with ``(i, L, seed)`` (a
    :class:`~brainfm.data.windows.WindowBatchSampler` request with ``pairs=True``) draws, from
    ``seed``, a rest run of the subject uniformly, a start uniformly in it, and the same for a task
    run; an ``int`` uses ``i`` as the seed (fixed pairs). ``L`` is ignored: both windows have the
    datasets' full length (R2T-Net crops in the model).

    Args:
        rest, task: window datasets whose items are ``(run, start)`` grid windows with stride 1
            (:class:`~brainfm.data.datasets.roi.ROIWindowDataset` or
            :class:`~brainfm.data.datasets.volume.VolumeClipDataset`), over the rest and task segments.
        rest_windows, task_windows: subject -> ``(first grid index, windows)`` of each run of that role
            (:meth:`~brainfm.data.windows.WindowIndex.run_windows`).
        subjects: the paired subjects (both roles present).
        view: the rest view's data key (``bold`` or ``volume``); the task view's is ``task_<view>``.
        pairs_per_subject: items per subject and epoch.

    Returns (per item) the rest window's dict plus ``task_<view>``, ``task_t``, ``task_onset``,
    ``task_run``.
    """

    def __init__(self, rest: Dataset, task: Dataset, rest_windows: dict[str, list[tuple[int, int]]],
                 task_windows: dict[str, list[tuple[int, int]]], subjects: Sequence[str], view: str,
                 pairs_per_subject: int = 1) -> None:
        if not subjects:
            raise ConfigError("no paired subjects (with both a rest and a task run)")
        self.rest, self.task = rest, task
        self.rest_windows, self.task_windows = rest_windows, task_windows
        self.subjects = list(subjects)
        self.view = view
        self.pairs_per_subject = int(pairs_per_subject)
        if self.pairs_per_subject < 1:
            raise ConfigError(f"data.pairs_per_subject={pairs_per_subject} must be >= 1")

    def __len__(self) -> int:
        return len(self.subjects) * self.pairs_per_subject

    @staticmethod
    def _draw(rng: np.random.Generator, runs: list[tuple[int, int]]) -> int:
        first, count = runs[int(rng.integers(len(runs)))]
        return int(first + int(rng.integers(count)))

    def pair(self, i: int, seed: int) -> tuple[int, int]:
        """Grid indices ``(rest, task)`` of item ``i`` drawn with ``seed``."""
        subject = self.subjects[int(i) % len(self.subjects)]
        rng = np.random.default_rng([int(seed) % 2**63, int(i)])
        return self._draw(rng, self.rest_windows[subject]), self._draw(rng, self.task_windows[subject])

    def __getitem__(self, item) -> dict:
        if isinstance(item, tuple):
            i, _, *seed = item
            seed = seed[0] if seed else i
        else:
            i = seed = int(item)
        r, t = self.pair(int(i), int(seed))
        sample = dict(self.rest[r])
        other = self.task[t]
        if other["subject"] != sample["subject"]:  # the grid bookkeeping is broken: never train on it
            raise RuntimeError(f"pair {i}: rest subject {sample['subject']} != task subject {other['subject']}")
        sample.update({"pair": int(i), f"task_{self.view}": other[self.view], "task_t": other["t"], "task_onset": other["onset"],
                       "task_run": other["run"], "task_window": other["window"]})
        return sample
