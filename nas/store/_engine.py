"""Engines and sessions: the one place that knows how each database must be opened.

Nothing here runs at import time; every engine comes from :func:`make_engine`, so each test (and
each process) can open its own database.

SQLite under several writers (two ``nas search`` workers on one file) needs three things, or a
writer fails at once with "database is locked" instead of waiting its turn:

* WAL journal mode, so readers never block the writer and the writer never blocks readers;
* a busy timeout (60 s), so a writer waits for the lock instead of failing;
* write transactions that take the write lock at ``BEGIN IMMEDIATE``. Python's sqlite3 driver
  begins lazily and SQLAlchemy reads before it writes, so a transaction would start as a reader
  and upgrade to a writer; when two processes do that at once, SQLite cannot wait (each holds
  what the other needs) and fails the upgrade immediately, busy timeout or not. The store's
  write sessions therefore run on a variant of the engine that begins with ``BEGIN IMMEDIATE``;
  reads begin deferred and never wait on a writer.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from nas.spec.errors import NasError

SQLITE_TIMEOUT_S = 60.0
_BEGIN_OPTION = "nas_sqlite_begin"


class StoreError(NasError):
    """The database cannot be opened or used: unreachable, schema behind, a name not found, a
    constraint broken. The message says what to do."""


def default_db_url() -> str:
    """``sqlite:///nas.db`` in the working directory, made absolute now.

    Absolute because Ray Tune runs trainables in per-trial working directories: a relative
    SQLite path would open a different, empty file in each of them.
    """
    return f"sqlite:///{Path.cwd() / 'nas.db'}"


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays reach us from measurement and training code.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for the JSON columns. NaN and infinities become null: PostgreSQL's json type rejects
    them, and a training curve that diverged would otherwise fail to store at all."""
    try:
        return json.dumps(value, default=_json_default, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite(value), default=_json_default, allow_nan=False, separators=(",", ":"))


def make_engine(url: str) -> Engine:
    """An engine set up for concurrent use of ``url`` (SQLite file or PostgreSQL)."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(f"not a database URL: {url!r} ({e}); e.g. sqlite:///nas.db or postgresql://host/db") from None
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                parent = Path(database).expanduser().resolve().parent
                if not parent.is_dir():
                    raise StoreError(f"{safe_url(url)}: the directory {parent} does not exist")
            engine = create_engine(
                parsed, connect_args={"timeout": SQLITE_TIMEOUT_S}, json_serializer=json_dumps
            )
            _setup_sqlite(engine)
        elif backend == "postgresql":
            # pool_pre_ping: a worker's pooled connection may have been closed by a server
            # restart while it trained for minutes.
            engine = create_engine(parsed, pool_pre_ping=True, json_serializer=json_dumps)
        else:
            engine = create_engine(parsed, pool_pre_ping=True, json_serializer=json_dumps)
    except ImportError as e:
        raise StoreError(f"{safe_url(url)}: the database driver is not installed ({e})") from None
    except ArgumentError as e:
        raise StoreError(f"{safe_url(url)}: {e}") from None
    return engine


def _setup_sqlite(engine: Engine, default_begin: str = "DEFERRED") -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN out of the driver's hands (see the module docstring); the "begin" hook
        # below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_TIMEOUT_S * 1000)}")
            _use_wal(cursor)
            # NORMAL is durable across application crashes in WAL mode (only an OS crash or
            # power loss can lose the last commits) and saves an fsync per transaction.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, default_begin)
        conn.exec_driver_sql(f"BEGIN {mode}")


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL (a persistent setting) unless it is already.

    Switching needs an exclusive lock for which SQLite does not call the busy handler: two
    processes opening a fresh file at once saw "database is locked" here at once. So check
    first (later opens never switch) and retry while another connection holds the lock.
    """
    deadline = time.monotonic() + SQLITE_TIMEOUT_S
    delay = 0.002
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.1)


def harden_foreign_sqlite_engine(engine: Engine) -> None:
    """Give an engine made elsewhere (Optuna's RDBStorage) the same SQLite set-up: WAL, busy
    timeout, and every transaction begun IMMEDIATE, since such code reads before it writes and
    cannot mark its write transactions for us. Connections opened before this are dropped."""
    if engine.dialect.name != "sqlite":
        return
    _setup_sqlite(engine, default_begin="IMMEDIATE")
    engine.dispose()


def writer(engine: Engine) -> Engine:
    """The engine for write transactions: on SQLite they take the write lock at BEGIN, so two
    writers queue on the busy timeout instead of deadlocking mid-transaction. It shares the
    pool of ``engine``."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error; driver errors come out as
    :class:`StoreError` with the database named and the cause said plainly."""
    session = Session(engine, expire_on_commit=False, autoflush=False)
    try:
        yield session
        session.commit()
    except SQLAlchemyError as e:
        session.rollback()
        raise StoreError(describe_error(e, str(engine.url))) from e
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def describe_error(error: SQLAlchemyError, url: str) -> str:
    """One line for a driver error: what happened and, where we know, what to do."""
    where = safe_url(url)
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip()
    detail = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, IntegrityError):
        return f"{where}: a constraint was broken: {detail}"
    if "database is locked" in detail:
        return (
            f"{where}: database is locked by another process (gave up after waiting up to "
            f"{SQLITE_TIMEOUT_S:.0f} s); for many workers use PostgreSQL"
        )
    if "no such table" in detail or ("relation" in detail and "does not exist" in detail):
        return f"{where}: {detail}; run `nas db upgrade --db {where}`"
    if isinstance(error, OperationalError):
        return f"{where}: cannot use the database: {detail}"
    return f"{where}: {detail}"
