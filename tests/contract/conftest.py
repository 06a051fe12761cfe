"""Fixtures for the contract suites: one PostgreSQL database, a fresh schema per test."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pg import Cluster


@pytest.fixture(scope="session")
def contract_dsn(postgres_cluster: Cluster) -> str:
    """A database of the contract suites' own on the session's PostgreSQL server."""
    return postgres_cluster.create_database()


@pytest.fixture
def pg_schema() -> str:
    """A schema name no other test uses (each store migrates its own)."""
    return "t_" + uuid.uuid4().hex[:16]
