"""Settings: defaults, derived database URL, refusing development tokens outside development."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainguard.service.config import DEV_TOKENS, Settings


SECRETS = {"viewer_token": "v" * 40, "operator_token": "o" * 40, "webhook_token": "w" * 40}


def test_defaults_run_in_development_with_sqlite_under_the_state_dir(tmp_path):
    s = Settings(state_dir=tmp_path / "st")
    assert s.environment == "development"
    assert s.database_url == f"sqlite:///{tmp_path / 'st' / 'trainguard.db'}"
    assert (s.host, s.port, s.watch_interval, s.watch_enabled) == ("127.0.0.1", 8700, 0.5, True)
    assert s.prometheus_url is None and s.sd_requires_auth and not s.metrics_requires_auth
    assert s.operator_token.get_secret_value() == DEV_TOKENS["operator_token"]


def test_environment_variables_are_read_with_the_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINGUARD_DATABASE_URL", "postgresql+psycopg2://u@db/x")
    monkeypatch.setenv("TRAINGUARD_WATCH_ENABLED", "false")
    monkeypatch.setenv("TRAINGUARD_PORT", "9000")
    s = Settings(state_dir=tmp_path)
    assert (s.database_url, s.watch_enabled, s.port) == ("postgresql+psycopg2://u@db/x", False, 9000)


@pytest.mark.parametrize("environment", ["staging", "production"])
@pytest.mark.parametrize("left_default", sorted(DEV_TOKENS))
def test_dev_tokens_are_refused_outside_development(environment, left_default):
    tokens = {**SECRETS, left_default: DEV_TOKENS[left_default]}
    with pytest.raises(ValidationError, match=f"TRAINGUARD_{left_default.upper()}"):
        Settings(environment=environment, **tokens)


def test_production_with_real_tokens_is_accepted():
    s = Settings(environment="production", **SECRETS)
    assert s.webhook_token.get_secret_value() == "w" * 40
    assert "w" * 40 not in repr(s)  # secrets do not leak into logs


def test_tokens_must_differ_because_the_token_decides_the_role():
    with pytest.raises(ValidationError, match="must differ"):
        Settings(**{**SECRETS, "viewer_token": "o" * 40})


@pytest.mark.parametrize("field, value", [("watch_interval", 0), ("watch_interval", -1), ("port", 70000)])
def test_out_of_range_numbers_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_on_the_prometheus_path_the_watch_queries_four_times_per_scrape(tmp_path):
    embedded = Settings(state_dir=tmp_path, watch_interval=0.5)
    assert embedded.effective_watch_interval() == 0.5, "the embedded path keeps its interval"
    prom = Settings(state_dir=tmp_path, watch_interval=0.5, prometheus_url="http://prom:9090",
                    prometheus_scrape_interval=1.0)
    assert prom.effective_watch_interval() == 0.25
    slow = Settings(state_dir=tmp_path, watch_interval=0.5, prometheus_url="http://prom:9090")
    assert slow.prometheus_scrape_interval == 5.0 and slow.effective_watch_interval() == 0.5


def test_user_code_settings_are_module_names_and_absolute_folders(tmp_path):
    s = Settings(state_dir=tmp_path, user_code_modules="mylab.stages, other", user_code_paths=str(tmp_path))
    assert s.user_code_modules == ["mylab.stages", "other"] and s.user_code_paths == [str(tmp_path.resolve())]
    with pytest.raises(ValidationError, match="TRAINGUARD_USER_CODE_MODULES"):
        Settings(state_dir=tmp_path, user_code_modules="../evil")
    with pytest.raises(ValidationError, match="TRAINGUARD_USER_CODE_PATHS"):
        Settings(state_dir=tmp_path, user_code_paths="relative/dir")
