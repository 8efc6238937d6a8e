"""Shared fixtures: the tiny offline checkpoint, a real Postgres database, log directories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.env import REPO, missing

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random-weight Qwen3-VL checkpoint (built offline on first use, then reused)."""
    from services.model.tiny_checkpoint import ensure_tiny_checkpoint

    path = Path(os.environ.get("TINY_MODEL_DIR", REPO / ".cache" / "tiny-qwen3-vl"))
    return ensure_tiny_checkpoint(path)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A fresh database on the real server at 127.0.0.1:5432, dropped afterwards."""
    import psycopg

    name = f"qvl_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL at {PG_ADMIN_DSN} ({exc})")
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def own_dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of this test alone, dropped afterwards (``postgres_dsn`` is shared by the whole session:
    a test that locks, fills or alters its database takes this one)."""
    import psycopg

    name = f"qvl_own_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_dsn.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    d = tmp_path / "logs"
    d.mkdir()
    return d
