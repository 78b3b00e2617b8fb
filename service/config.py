"""Deployment settings: one pydantic-settings `Settings`, read from `TRAINGUARD_*` variables.

Built-in development tokens are refused outside `environment == "development"`
(as the full-stack FastAPI template refuses "changethis").
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "DEV_TOKENS"]

log = logging.getLogger(__name__)

# Known to everyone who reads this file: fine on a laptop, refused in production.
DEV_TOKENS = {
    "viewer_token": "dev-viewer-token",
    "operator_token": "dev-operator-token",
    "webhook_token": "dev-webhook-token",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINGUARD_", extra="ignore", validate_default=True)

    environment: Literal["development", "staging", "production"] = "development"
    """Anything but "development" refuses the built-in tokens."""

    state_dir: Path = Path(".trainguard")
    """Database (by default), checkpoints and fired-fault markers live here."""

    database_url: str = ""
    """SQLAlchemy URL; empty means `sqlite:///<state_dir>/trainguard.db`."""

    prometheus_url: str | None = None
    """PromQL source for the detectors; None scrapes the workers' /metrics directly."""

    viewer_token: SecretStr = SecretStr(DEV_TOKENS["viewer_token"])
    """Bearer token for reads."""
    operator_token: SecretStr = SecretStr(DEV_TOKENS["operator_token"])
    """Bearer token for control actions and reads."""
    webhook_token: SecretStr = SecretStr(DEV_TOKENS["webhook_token"])
    """Bearer token Alertmanager sends to POST /api/v1/alerts (valid nowhere else)."""

    sd_requires_auth: bool = True
    """GET /api/v1/sd asks for the viewer token (Prometheus http_sd_configs `authorization`)."""
    metrics_requires_auth: bool = False
    """/metrics asks for the viewer token (off: Prometheus scrapes it like any exporter)."""

    grafana_url: str | None = None
    grafana_token: SecretStr | None = None

    watch_interval: float = Field(0.5, gt=0.0, le=3600.0)
    """Seconds between watch cycles."""
    watch_enabled: bool = True
    """False: the supervisor does not watch on its own; only alerts drive recovery."""

    hang_timeout: float = Field(60.0, gt=0.0, le=86400.0)
    """Seconds without a finished step (not paused) before a rank counts as hung."""
    startup_grace: float = Field(120.0, gt=0.0, le=86400.0)
    """Seconds a freshly started worker group may take to its first step before a hang is declared."""

    host: str = "127.0.0.1"
    port: int = Field(8700, ge=0, le=65535)

    @model_validator(mode="after")
    def _derive_and_check(self) -> "Settings":
        self.state_dir = self.state_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.state_dir / 'trainguard.db'}"
        tokens = {name: getattr(self, name).get_secret_value() for name in DEV_TOKENS}
        defaults = [name for name, value in tokens.items() if value == DEV_TOKENS[name]]
        if defaults and self.environment != "development":
            names = ", ".join(f"TRAINGUARD_{n.upper()}" for n in defaults)
            raise ValueError(
                f"{names} still set to the built-in development value; "
                f"set a secret (or TRAINGUARD_ENVIRONMENT=development)"
            )
        if defaults:
            log.info("using built-in development tokens for %s", ", ".join(defaults))
        empty = [name for name, value in tokens.items() if not value]
        if empty:
            raise ValueError(f"{', '.join(empty)} must not be empty")
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("viewer_token, operator_token and webhook_token must differ (the token decides the role)")
        return self

    def resolved_database_url(self) -> str:
        """The database URL (already derived from state_dir when not set)."""
        return self.database_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
