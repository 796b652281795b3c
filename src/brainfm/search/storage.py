"""Where a study lives: SQLite for one process, a journal file on a shared file system for SLURM
worker arrays, an RDB server (PostgreSQL) for many workers.

``search.storage`` takes

- ``sqlite`` (the default): ``sqlite:///<search.dir>/study.db``, for one process (or a few on a
  local disk; SQLite's locking is unreliable on Lustre/NFS);
- ``journal``: ``<search.dir>/study.journal``, Optuna's journal file backend: one append-only
  file that workers on many nodes share through ``$SCRATCH``;
- an RDB URL, ``postgresql+psycopg2://user:password@host:5432/db`` (or ``sqlite:///path``,
  ``mysql+pymysql://...``), for many workers;
- a file path (``*.journal``, ``*.log``) or ``journal:<path>``: a journal file elsewhere.

Every storage has a heartbeat: a worker records one every ``heartbeat_interval`` seconds while a
trial runs; a RUNNING trial without one for ``grace_period`` seconds belongs to a dead worker
(``kill -9``, node failure, time limit) and is marked FAIL by the next worker that looks
(``optuna.storages.fail_stale_trials``), optionally re-queued with the same parameters
(``RetryHeartbeatStaleTrialCallback``). Optuna's ``RDBStorage`` has this built in; its journal
storage has no heartbeat, so :class:`HeartbeatJournalStorage` adds one through Optuna's own
``BaseHeartbeat`` interface (so ``study.optimize`` starts the heartbeat thread and fails stale
trials exactly as it does for an RDB).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalFileSymlinkLock
from optuna.trial import TrialState

from brainfm.errors import ConfigError

HEARTBEAT_ATTR = "brainfm:heartbeat"
_RDB = re.compile(r"^(sqlite|postgresql|postgres|mysql|mariadb|oracle|mssql)(\+\w+)?://")


def resolve_storage(storage: str | None, study_dir: str | Path) -> tuple[str, str]:
    """``(kind, location)`` of ``search.storage``: kind ``rdb`` (location: a SQLAlchemy URL) or
    ``journal`` (location: a file path).

    Raises:
        ConfigError: an unknown URL scheme, or ``postgres://`` (SQLAlchemy wants ``postgresql://``).
    """
    study_dir = Path(study_dir)
    value = "sqlite" if storage in (None, "") else str(storage)
    if value == "sqlite":
        return "rdb", f"sqlite:///{(study_dir / 'study.db').resolve()}"
    if value == "journal":
        return "journal", str((study_dir / "study.journal").resolve())
    if value.startswith("journal:"):
        path = value[len("journal:"):]
        path = path[2:] if path.startswith("//") else path
        return "journal", str(Path(path).expanduser().resolve())
    if value.startswith("postgres://"):
        raise ConfigError(f"search.storage={redact(value)}: write postgresql:// (or postgresql+psycopg2://), "
                          "SQLAlchemy does not accept postgres://")
    if _RDB.match(value):
        return "rdb", value
    if "://" in value:
        raise ConfigError(f"search.storage={redact(value)}: unknown scheme; use sqlite, journal, a journal file path, "
                          "or an RDB URL (postgresql+psycopg2://user:password@host:5432/db)")
    return "journal", str(Path(value).expanduser().resolve())


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and files)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's ``JournalStorage`` with the heartbeat of ``RDBStorage``.

    A heartbeat is a trial system attribute (``brainfm:heartbeat``, Unix time in seconds) written
    every ``heartbeat_interval`` seconds by the worker running the trial; a RUNNING trial is stale
    when its last heartbeat (or, before the first, its start) is older than ``grace_period``
    seconds. Clocks of the nodes sharing a journal must agree to well within ``grace_period``
    (NTP on any cluster).

    Args:
        backend: the journal backend (a ``JournalFileBackend``).
        heartbeat_interval: seconds between heartbeats (int, > 0).
        grace_period: seconds without a heartbeat after which a trial is stale (default
            ``2 * heartbeat_interval``, as RDBStorage).
        heartbeat_stale_trial_callback: called with ``(study, trial)`` for each trial failed as
            stale (e.g. ``RetryHeartbeatStaleTrialCallback``).
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int | None = None,
                 heartbeat_stale_trial_callback=None) -> None:
        if int(heartbeat_interval) <= 0:
            raise ConfigError(f"search.heartbeat_interval={heartbeat_interval} must be a positive number of seconds")
        super().__init__(backend)
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period) if grace_period else 2 * self.heartbeat_interval
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed as stale by another worker meanwhile; this worker's tell will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(last) > self.grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback


def make_storage(kind: str, location: str, *, heartbeat_interval: int, grace_period: int | None = None,
                 retry_stale: int = 0, create_tables: bool = True, journal_lock: str = "symlink"):
    """Build the Optuna storage of :func:`resolve_storage`'s ``(kind, location)``.

    Args:
        heartbeat_interval, grace_period: seconds (see the module docstring).
        retry_stale: re-queue a stale trial with the same parameters up to this many times.
        create_tables: create the RDB schema; workers joining an existing study pass ``False``,
            so that concurrent workers never race to create tables.
        journal_lock: ``symlink`` (Optuna's default) or ``open`` (for file systems without
            atomic symlinks).

    Raises:
        ConfigError: the journal file's folder cannot be created, an unknown lock.
    """
    callback = None
    if retry_stale and int(retry_stale) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=int(retry_stale))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "rdb":
            engine_kwargs = {"pool_pre_ping": True}
            if location.startswith("sqlite"):
                engine_kwargs = {"connect_args": {"timeout": 60}}
                path = location.split(":///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
            return RDBStorage(location, engine_kwargs=engine_kwargs, heartbeat_interval=int(heartbeat_interval),
                              grace_period=int(grace_period) if grace_period else None,
                              heartbeat_stale_trial_callback=callback, skip_table_creation=not create_tables)
        if kind != "journal":
            raise ConfigError(f"unknown storage kind {kind!r}")
        path = Path(location)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"search.storage: cannot create the folder of the journal file {path}: {exc}") from exc
        locks = {"symlink": JournalFileSymlinkLock, "open": JournalFileOpenLock}
        if journal_lock not in locks:
            raise ConfigError(f"search.journal_lock={journal_lock!r} must be 'symlink' or 'open'")
        backend = JournalFileBackend(str(path), lock_obj=locks[journal_lock](str(path)))
        return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period, callback)
