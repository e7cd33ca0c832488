"""Settings from the environment."""

from __future__ import annotations

import pytest

from server.config import Settings


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
