"""Settings from the environment."""

from __future__ import annotations

import pytest

from server.app import build_store
from server.config import Settings
from server.pg_store import PostgresStore
from server.sqlite_store import SQLiteStore


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.db_path) == ("127.0.0.1", 8000, "./data/dac.db")
    assert s.coalesce_enabled and s.stream_fanout_enabled
    assert (s.error_ttl_s, s.result_ttl_s) == (2.0, 60.0)


def test_environment_overrides() -> None:
    s = Settings.from_env({"DAC_PORT": "8123", "COALESCE_ENABLED": "0", "STREAM_FANOUT_ENABLED": "false",
                           "DAC_ERROR_TTL_S": "0.5", "DAC_CANCEL_GRACE_MS": "20", "DAC_DB": "/tmp/x.db"})
    assert s.port == 8123 and not s.coalesce_enabled and not s.stream_fanout_enabled
    assert s.error_ttl_s == 0.5 and s.cancel_grace_s == pytest.approx(0.02) and s.db_path == "/tmp/x.db"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DAC_PORT", "eighty", "DAC_PORT must be a number"),
    ("COALESCE_ENABLED", "maybe", "COALESCE_ENABLED must be 0 or 1"),
    ("DAC_RESULT_TTL_S", "-1", "DAC_RESULT_TTL_S must be at least 0"),
])
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})


def test_the_database_url_puts_threads_on_postgresql() -> None:
    unset = Settings.from_env({"DAC_DB": "/tmp/x.db"})
    assert (unset.database_url, unset.database_pool_size, unset.database) == (None, 10, "/tmp/x.db")
    store = build_store(unset)
    assert isinstance(store, SQLiteStore) and store.engine == "sqlite"
    for url in ("postgresql://dac:pw@db.internal:5433/dac?schema=chat", "postgres://db/dac"):
        s = Settings.from_env({"DAC_DATABASE_URL": url, "DAC_DATABASE_POOL_SIZE": "3"})
        assert (s.database_url, s.database_pool_size) == (url, 3)
        store = build_store(s)
        assert isinstance(store, PostgresStore) and store.engine == "postgresql" and store.pool_size == 3
    shown = Settings.from_env({"DAC_DATABASE_URL": "postgresql://dac:pw@db/dac"}).database
    assert shown == "postgresql://dac:***@db/dac"  # what the start line prints


@pytest.mark.parametrize(("name", "value", "message"), [
    ("DAC_DATABASE_URL", "mysql://dac:pw@db/dac", "DAC_DATABASE_URL must start with postgresql:// or postgres://"),
    ("DAC_DATABASE_URL", "db.internal/dac", "DAC_DATABASE_URL must start with postgresql:// or postgres://"),
    ("DAC_DATABASE_URL", "postgresql://dac:pw@db:port/dac", "DAC_DATABASE_URL is not a valid URL"),
    ("DAC_DATABASE_POOL_SIZE", "0", "DAC_DATABASE_POOL_SIZE must be at least 1"),
    ("DAC_DATABASE_POOL_SIZE", "many", "DAC_DATABASE_POOL_SIZE must be a number"),
])
def test_bad_database_settings_name_the_variable_and_hide_the_password(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        Settings.from_env({name: value})
    assert ":pw@" not in str(caught.value)
