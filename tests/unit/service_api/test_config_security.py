"""Settings that keep a deployment safe by default: development tokens only on loopback,
long tokens outside development, no token in any error, allowed roots for pipelines."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainguard.service.config import DEV_TOKENS, MIN_TOKEN_LENGTH, Settings, is_loopback


LONG = {"viewer_token": "v" * 40, "operator_token": "o" * 40, "webhook_token": "w" * 40}


# --- development tokens and where the server listens ----------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "supervisor.example.com"])
def test_development_tokens_are_refused_when_the_server_binds_a_reachable_address(tmp_path, host):
    with pytest.raises(ValidationError) as e:
        Settings(state_dir=tmp_path, environment="development", host=host)
    message = str(e.value)
    assert "TRAINGUARD_VIEWER_TOKEN" in message and "TRAINGUARD_OPERATOR_TOKEN" in message and host in message
    assert DEV_TOKENS["operator_token"] not in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1"])
def test_development_tokens_work_on_loopback(tmp_path, host):
    assert is_loopback(host)
    s = Settings(state_dir=tmp_path, host=host)
    assert s.operator_token.get_secret_value() == DEV_TOKENS["operator_token"]


def test_real_tokens_may_bind_any_address(tmp_path):
    s = Settings(state_dir=tmp_path, environment="production", host="0.0.0.0", **LONG)
    assert s.host == "0.0.0.0"


# --- token length outside development -----------------------------------------------------------


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_tokens_under_32_characters_are_refused_outside_development(tmp_path, environment):
    short = {**LONG, "webhook_token": "w" * (MIN_TOKEN_LENGTH - 1)}
    with pytest.raises(ValidationError, match="TRAINGUARD_WEBHOOK_TOKEN must be at least 32 characters"):
        Settings(state_dir=tmp_path, environment=environment, **short)
    exact = {**LONG, "webhook_token": "w" * MIN_TOKEN_LENGTH}
    assert Settings(state_dir=tmp_path, environment=environment, **exact).environment == environment


def test_short_tokens_are_fine_on_a_development_laptop(tmp_path):
    assert Settings(state_dir=tmp_path, viewer_token="v" * 8, operator_token="o" * 8, webhook_token="w" * 8)


# --- no token in an error -----------------------------------------------------------------------


def test_a_refused_token_is_not_printed_in_the_error(tmp_path):
    secret = "s3cr3t-but-too-short-token"
    with pytest.raises(ValidationError) as e:
        Settings(state_dir=tmp_path, environment="production", **{**LONG, "operator_token": secret})
    assert secret not in str(e.value) and secret not in repr(e.value)
    assert "TRAINGUARD_OPERATOR_TOKEN" in str(e.value)


def test_tokens_from_the_environment_are_not_printed_when_another_setting_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINGUARD_OPERATOR_TOKEN", "o" * 40)
    monkeypatch.setenv("TRAINGUARD_PORT", "not-a-port")
    with pytest.raises(ValidationError) as e:
        Settings(state_dir=tmp_path)
    assert "port" in str(e.value) and "o" * 40 not in str(e.value)


def test_tokens_can_come_from_a_secrets_folder(monkeypatch, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in LONG.items():
        (secrets / f"trainguard_{name}").write_text(value)
    monkeypatch.setenv("TRAINGUARD_SECRETS_DIR", str(secrets))
    s = Settings(state_dir=tmp_path, environment="production", host="0.0.0.0")
    assert s.webhook_token.get_secret_value() == LONG["webhook_token"]


# --- allowed roots --------------------------------------------------------------------------------


def test_pipelines_are_confined_under_the_state_dir_by_default(tmp_path):
    s = Settings(state_dir=tmp_path / "st")
    assert s.allowed_data_roots == [str(tmp_path / "st" / "data")]
    assert s.allowed_storage == [str(tmp_path / "st" / "checkpoints")]


def test_allowed_roots_from_the_environment_as_a_list_or_commas(monkeypatch, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("TRAINGUARD_ALLOWED_DATA_ROOTS", f"{tmp_path / 'link'}, /srv/corpora")
    monkeypatch.setenv("TRAINGUARD_ALLOWED_STORAGE", '["/mnt/ckpt/", "s3://Bucket/runs/"]')
    s = Settings(state_dir=tmp_path)
    assert s.allowed_data_roots == [str(tmp_path / "real"), "/srv/corpora"]  # symlinks resolved
    assert s.allowed_storage == ["/mnt/ckpt", "s3://Bucket/runs"]


@pytest.mark.parametrize(
    "setting, value",
    [
        ("allowed_data_roots", "relative/data"),
        ("allowed_data_roots", "s3://bucket/data"),
        ("allowed_storage", "ckpt"),
        ("allowed_storage", "http://example.com/ckpt"),
        ("allowed_storage", "ftp://host/ckpt"),
        ("allowed_storage", "github://org:repo@main/"),
        ("allowed_storage", "memory://ckpt"),
        ("allowed_storage", "simplecache::s3://bucket/ckpt"),
        ("allowed_storage", "s3://key:secret@bucket/ckpt"),
        ("allowed_storage", "s3://bucket/ckpt/../other"),
        ("allowed_storage", "s3:///no-bucket"),
    ],
)
def test_allowed_roots_that_are_not_plain_folders_or_buckets_are_refused(tmp_path, setting, value):
    with pytest.raises(ValidationError, match=f"TRAINGUARD_{setting.upper()}"):
        Settings(state_dir=tmp_path, **{setting: [value]})
