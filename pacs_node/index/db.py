"""The index's connection: SQLite (WAL) through peewee, its pragmas, the one write lock, and
the translation of database errors into IndexFailure and its kinds.

Every other module of `index/` reaches the database through a `Database` and speaks of
failures only through `translate_errors`, so what a caller sees of SQLite is always an
IndexFailure (the caller maps it to a failure status or an exit code).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import peewee as pw

from pacs_node.fsio import fsync_dir, makedirs_durable
from pacs_node.index.schema import Models, build_models, migrate

log = logging.getLogger(__name__)

# Ids or UIDs bound per `IN (...)`: SQLite allows 32766 bound parameters by default (999 in
# builds before 3.32), so stay well below.
PARAMS_PER_STATEMENT = 500


class IndexFailure(RuntimeError):
    """The index could not answer or record (the caller maps this to a failure status)."""


class IndexBusy(IndexFailure):
    """The database stayed locked past the busy timeout."""


class DuplicateVersion(IndexFailure):
    """Another writer indexed the same SOP Instance UID and version first."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def timestamp(value: datetime) -> str:
    """A time as the index writes it in hand-written SQL: naive UTC, ISO with a space (what
    peewee's DateTimeField writes too, so both compare as text)."""
    return value.isoformat(sep=" ")


def as_datetime(value: object) -> datetime | None:
    """A stored time back as a datetime (raw SQL returns the text)."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Database errors raised inside become IndexFailure (IndexBusy, DuplicateVersion) saying
    `what` was being done."""
    try:
        yield
    except pw.IntegrityError as e:
        if "instance.sop_uid" in str(e):
            raise DuplicateVersion(f"{what}: {e}") from e
        raise IndexFailure(f"{what}: {e}") from e
    except (pw.OperationalError, sqlite3.OperationalError) as e:
        if "locked" in str(e) or "busy" in str(e):
            raise IndexBusy(f"{what}: database is locked ({e})") from e
        raise IndexFailure(f"{what}: {e}") from e
    except pw.PeeweeException as e:
        raise IndexFailure(f"{what}: {e}") from e


def insert_statement(model: type[pw.Model], names: Iterable[str]) -> str:
    """`INSERT INTO <table> (<columns>) VALUES (?, ...)` from the model's own names."""
    meta = model._meta  # type: ignore[attr-defined]
    columns = [meta.fields[name].column_name for name in names]
    return (
        f"INSERT INTO {meta.table_name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )


def table(model: type[pw.Model]) -> str:
    return model._meta.table_name  # type: ignore[attr-defined, no-any-return]


def column(model: type[pw.Model], name: str) -> str:
    return model._meta.fields[name].column_name  # type: ignore[attr-defined, no-any-return]


class Database:
    """One index file: the peewee database (a connection per thread), its models, and the
    lock this node's writers queue on. Safe to use from any thread."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.db = pw.SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                # FULL: a commit is fsynced to the WAL before it returns (the durability contract).
                "synchronous": "full",
                "foreign_keys": 1,
                "busy_timeout": int(busy_timeout_s * 1000),
            },
            timeout=busy_timeout_s,
            check_same_thread=False,
        )
        self.models: Models = build_models(self.db)
        # Held around every write transaction of this node. Reentrant: a group commit holds it
        # while it writes the batch through `writing()` (index/instances.py).
        self.write_lock = threading.RLock()

    def open(self) -> None:
        makedirs_durable(self.path.parent)
        with translate_errors("opening the index"):
            self.db.connect(reuse_if_open=True)
            started_from = migrate(self.db, self.models)
        # The names of the database and its WAL survive a power cut from the first commit on
        # (SQLite syncs the directory when it creates a rollback journal, not for a WAL).
        fsync_dir(self.path.parent)
        if started_from == 0:
            log.info("event=index_created path=%s", self.path)

    def release_thread(self) -> None:
        """Close this thread's connection (an association's thread is about to end)."""
        if not self.db.is_closed():
            self.db.close()

    def busy(self, what: str) -> IndexBusy:
        return IndexBusy(
            f"{what}: database is locked (this node's other writers held it for more "
            f"than {self.busy_timeout_s:g} s)"
        )

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); IndexFailure on failure.

        This node's writers queue on a lock, each woken the moment the last one commits.
        Left to SQLite, a writer that finds the database locked sleeps 1, 2, 5, 10... ms
        between tries: with four associations storing at once, commits stalled for up to
        230 ms (p99 19-34 ms, 0.9 ms with the lock). The busy timeout still bounds the wait,
        here and against other processes.
        """
        if not self.write_lock.acquire(timeout=self.busy_timeout_s):
            raise self.busy(what)
        try:
            with translate_errors(what), self.db.atomic("IMMEDIATE"):
                yield
        finally:
            self.write_lock.release()
