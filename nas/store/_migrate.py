"""Alembic, driven from code: no alembic.ini, the migrations found beside the package.

Our history shares the database with Optuna's, which has its own ``alembic_version`` table. Two
things keep them apart (docs/dependencies.md): our version table is ``nas_alembic_version``, and every
comparison sees only ``nas_*`` tables (:func:`include_name`, :func:`include_object`), or
autogenerate would propose dropping Optuna's tables.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from nas.store._engine import StoreError, describe_error, make_engine, safe_url, writer

VERSION_TABLE = "nas_alembic_version"
SCHEMA_HEAD = "0004"
"""The revision these models match: alembic's head, kept here so that opening a store (``nas
pareto``, the web page) checks the schema without importing alembic (a tenth of a second, a
tenth of the command). A test keeps it equal to ``head_revision()``; a new migration updates it."""
TABLE_PREFIX = "nas_"
# Any fixed 64-bit number: the PostgreSQL advisory lock that serialises concurrent upgrades
# (two workers started at once on a fresh database would both try to create the tables).
_PG_LOCK_KEY = 0x6E61735F64622021


def migrations_dir() -> Path:
    """The checkout's ``alembic/`` (source or editable install), else the copy shipped in the
    wheel under ``nas/_data/alembic`` (as :func:`nas.spec.files.definition_dirs` finds search spaces).

    Checked by its ``env.py``: for an installed wheel the checkout path is
    ``site-packages/alembic``, which is the alembic library itself.
    """
    pkg = Path(__file__).resolve().parents[1]
    for d in (pkg.parent / "alembic", pkg / "_data" / "alembic"):
        if (d / "env.py").is_file() and (d / "versions").is_dir():
            return d
    raise StoreError(f"the database migrations are missing (no alembic/ beside {pkg}); reinstall nas")


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Reflect only our tables (Optuna's and anyone else's are not ours to compare)."""
    if type_ == "table":
        return bool(name) and name.startswith(TABLE_PREFIX)  # type: ignore[union-attr]
    return True


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Compare only objects of ``nas_*`` tables (a second guard beside :func:`include_name`)."""
    if type_ == "table":
        return bool(name) and name.startswith(TABLE_PREFIX)  # type: ignore[union-attr]
    table = getattr(obj, "table", None)
    return table is None or table.name.startswith(TABLE_PREFIX)


def context_options() -> dict[str, Any]:
    """What env.py passes to ``context.configure`` and what schema checks compare with."""
    return {
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "include_object": include_object,
        "compare_type": True,
    }


def alembic_config(url: str, connection: Connection | None = None) -> Any:
    """An alembic Config built in code. With ``connection``, env.py migrates on it (inside the
    caller's transaction); without, env.py opens ``url`` itself (e.g. for ``command.revision``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    cfg.attributes["url"] = url
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@cache
def head_revision() -> str:
    """The revision this code's models match (one head: the history is linear)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    if head is None:
        raise StoreError(f"{migrations_dir()} holds no migrations; reinstall nas")
    return head


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory(str(migrations_dir())).walk_revisions()}


def revision_of(connection: Connection) -> str | None:
    """Our schema's revision on this connection; None where our tables were never created.

    Read with plain SQL, as alembic's MigrationContext reads it (one row: the history is linear)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def current_revision(url: str) -> str | None:
    """Our schema's revision in the database at ``url`` (None: never upgraded)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return revision_of(conn)
    except SQLAlchemyError as e:
        raise StoreError(describe_error(e, url)) from e
    finally:
        engine.dispose()


def schema_problem(current: str | None, url: str) -> str | None:
    """Why a database at revision ``current`` cannot be used by this code, or None if it can."""
    if current == SCHEMA_HEAD:
        return None
    head = head_revision()
    where = safe_url(url)
    if current is None:
        return f"{where} has no nas tables yet; run `nas db upgrade --db {where}`"
    if current not in known_revisions():
        return (
            f"{where} has nas schema revision {current}, newer than this nas knows (its latest is {head}); "
            f"upgrade the nas package"
        )
    return f"{where} has nas schema revision {current}, behind this nas ({head}); run `nas db upgrade --db {where}`"


def check_schema(url: str) -> None:
    """Raise :class:`StoreError` with the command to run unless the schema is at head."""
    problem = schema_problem(current_revision(url), url)
    if problem:
        raise StoreError(problem)


def upgrade_engine(engine: Engine, url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate through ``engine`` in one transaction; returns (revision before, revision after).

    The transaction takes the write lock first (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory
    lock) so that concurrent upgrades queue: the second finds the first one's result and does
    nothing. Both databases run DDL inside a transaction, so a failed step leaves no half schema.
    """
    from alembic.command import upgrade as alembic_upgrade
    from alembic.util import CommandError

    try:
        with writer(engine).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            before = revision_of(conn)
            if before is not None and before not in known_revisions():
                raise StoreError(schema_problem(before, url) or "")
            alembic_upgrade(alembic_config(url, connection=conn), revision)
            return before, revision_of(conn)
    except SQLAlchemyError as e:
        raise StoreError(describe_error(e, url)) from e
    except CommandError as e:
        raise StoreError(f"{safe_url(url)}: cannot upgrade to {revision!r}: {e}") from e


def upgrade(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring our schema at ``url`` to ``revision`` (default: head); safe to run again, and from
    several processes at once. Returns (revision before, revision after)."""
    engine = make_engine(url)
    try:
        return upgrade_engine(engine, url, revision)
    finally:
        engine.dispose()


def schema_diff(url: str) -> list[Any]:
    """What autogenerate would change to make the database at ``url`` match the models (empty
    when the migrations and the models agree); Optuna's tables are not looked at."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from nas.store.models import Base

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts=context_options()), Base.metadata)
    finally:
        engine.dispose()
