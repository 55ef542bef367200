"""Fixtures shared by every test module; the helpers themselves are in :mod:`tests.support`."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")

from tests.support import require_test_data  # noqa: E402


@pytest.fixture
def data_dir() -> Path:
    """The shared real-data folder ($DICOM_NODE_TEST_DATA); skips only when unset."""
    return require_test_data()


@pytest.fixture
def ct_series_dir(data_dir: Path) -> Path:
    """The real 28-slice GE head CT."""
    return data_dir / "ct_series" / "ge_head_tilt"


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (tests take a fresh database each: ``new_database()``)."""
    from tests.support.postgres import running_postgres

    with running_postgres() as server:
        yield server
