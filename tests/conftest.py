"""Shared fixtures: a PostgreSQL server for the cases that must run against one, and a quick
search's arguments (`fast`).

PostgreSQL is found at ``NAS_TEST_PG_URL`` (default: the local server, user postgres). Each test
that needs it gets a database of its own, created through the server's ``postgres`` database
and dropped afterwards. Where the server cannot be reached the PostgreSQL cases are skipped with
the reason, except under CI (``CI`` set), where they must run and fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("NAS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_unreachable_reason() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # any driver or network error means: no server for these tests
        return f"PostgreSQL at {make_url(PG_ADMIN_URL).render_as_string()} is unreachable: {str(e).splitlines()[0]}"
    return None


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Any]:
    reason = _pg_unreachable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the PostgreSQL cases must run there)")
        pytest.skip(reason)
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def fresh_pg_database(admin: Any) -> Iterator[str]:
    name = f"nas_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A quick search's arguments on the fused tiny space (tests.search_helpers.fused_tiny_space): a 300 kB slice of
    the corpus, 8k training tokens per trial."""
    from tests.search_helpers import fused_tiny_space

    space = fused_tiny_space(tmp_path_factory.mktemp("fused-space"))
    return ["--space", str(space), "--max-bytes", "300000", "--tokens", "8192"]
