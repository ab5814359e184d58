"""Alembic environment for the ``nas_*`` tables, which share their database with Optuna's.

Run by :mod:`nas.store._migrate` (no alembic.ini): it hands over an open connection inside a
transaction it holds (``config.attributes["connection"]``), or only a URL (``sqlalchemy.url``),
e.g. when a developer autogenerates a revision (see README.md here).
"""

from __future__ import annotations

from alembic import context

from nas.store._engine import make_engine, writer
from nas.store._migrate import context_options
from nas.store.models import Base

config = context.config


def _configure(**kwargs: object) -> None:
    context.configure(target_metadata=Base.metadata, **context_options(), **kwargs)  # type: ignore[arg-type]


def run_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade --sql``)."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, render_as_batch=str(url).startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # The caller's transaction: alembic sees it and opens none of its own.
        # render_as_batch: SQLite cannot ALTER most things, so later revisions copy the table.
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(str(url))
    try:
        with writer(engine).begin() as conn:
            _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
