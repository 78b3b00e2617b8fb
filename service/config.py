"""Deployment settings: one pydantic-settings `Settings`, read from `TRAINGUARD_*` variables.

Secure by default (as the full-stack FastAPI template refuses "changethis"):
the built-in development tokens work only in `environment == "development"` and
only while the server binds a loopback address; outside development every token
has at least 32 characters. Validation errors never echo an input value, so a
token that fails a check is not printed.

Tokens may also come from files named `trainguard_viewer_token` etc. in the folder
`TRAINGUARD_SECRETS_DIR` (Docker/compose secrets: `/run/secrets`).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from trainguard.service.domain.detectors import HangConfig
from trainguard.service.domain.evaluate import DEFAULT_STARTUP_GRACE_S

__all__ = ["Settings", "get_settings", "DEV_TOKENS", "MIN_TOKEN_LENGTH", "OBJECT_STORE_SCHEMES", "is_loopback"]

log = logging.getLogger(__name__)

# Known to everyone who reads this file: fine on a laptop, refused anywhere else.
DEV_TOKENS = {
    "viewer_token": "dev-viewer-token",
    "operator_token": "dev-operator-token",
    "webhook_token": "dev-webhook-token",
}
MIN_TOKEN_LENGTH = 32  # outside development: `openssl rand -hex 32` gives 64

# Object stores a checkpoint root may name. Everything else that fsspec can open (http,
# ftp, github, sftp, ssh, hdfs, chained `a::b` URLs, caches, archives) reaches other hosts
# or the supervisor's own files, so no setting can allow it.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

Roots = Annotated[list[str], NoDecode]  # NoDecode: the validator below reads JSON or commas
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")  # a dotted module name


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a routable address


class Settings(BaseSettings):
    # hide_input_in_errors: a ValidationError would otherwise print every input (the tokens).
    model_config = SettingsConfigDict(
        env_prefix="TRAINGUARD_", extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    environment: Literal["development", "staging", "production"] = "development"
    """Anything but "development" refuses the built-in tokens and tokens under 32 characters."""

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

    allowed_data_roots: Roots = Field(default_factory=list)
    """Folders whose files a pipeline's `data:` may name (symlinks resolved); a JSON list or
    comma-separated. Empty: `<state_dir>/data` only."""
    allowed_storage: Roots = Field(default_factory=list)
    """Where a pipeline's `checkpoint.storage` may point: local folders, or object-store
    prefixes such as `s3://bucket/prefix` (schemes: s3, s3a, gs, gcs, az, abfs, abfss).
    Empty: `<state_dir>/checkpoints` only. Credentials and other storage options come from
    the workers' environment (e.g. AWS_* variables), never from a pipeline."""

    user_code_modules: Roots = Field(default_factory=list)
    """Module prefixes a `kind: custom` or `kind: loop` stage's `entrypoint` may name (e.g.
    `mylab.stages` allows `mylab.stages` and `mylab.stages.x`); a JSON list or comma-separated.
    Empty (the default): no user code runs. The supervisor never imports it: entrypoints are
    checked in a Ray task of their own at submit, and imported only by the rank actors."""
    user_code_paths: Roots = Field(default_factory=list)
    """Absolute folders put on the rank actors' import path (sys.path) before an entrypoint is
    imported; where user modules live when they are not installed packages."""

    max_request_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    """Request bodies above this are refused with 413 (counted as they arrive)."""

    grafana_url: str | None = None
    grafana_token: SecretStr | None = None

    watch_interval: float = Field(0.5, gt=0.0, le=3600.0)
    """Seconds between watch cycles (on the Prometheus path at most a quarter of
    `prometheus_scrape_interval`: see `effective_watch_interval`)."""
    prometheus_scrape_interval: float = Field(5.0, gt=0.0, le=3600.0)
    """Prometheus' scrape interval for the workers (deploy/prometheus/prometheus.yml: 5 s). With
    `prometheus_url` set the watch queries four times per scrape, so a scrape that shows a problem
    is read within a quarter interval of landing: detection within ~1.25 scrape intervals of the
    onset, instead of up to one scrape plus one watch interval."""
    watch_enabled: bool = True
    """False: the supervisor does not watch on its own; only alerts drive recovery."""

    hang_timeout: float = Field(HangConfig().timeout_s, gt=0.0, le=86400.0)
    """Caps the hang detector's floor: a rank counts as hung when its last finished step (not
    paused) is older than max(floor, 5 x the longest recent step gap, 10 x the median gap), with
    floor = min(this, max(10 s, 100 x the median gap)) (docs/internals.md, "Liveness detectors")."""
    hang_idle_floor: float = Field(HangConfig().idle_floor_s, ge=0.0, le=86400.0)
    """The floor instead, while every rank's worker process has been idle (neither running nor
    waiting to run: workers/runtime/busy.py) for a second: a hung step loop and its peers blocked
    in a collective are found within ~1-2 s instead of the 10 s least floor. Embedded path only
    (Prometheus does not carry the reading). 0: off."""
    startup_grace: float = Field(DEFAULT_STARTUP_GRACE_S, gt=0.0, le=86400.0)
    """Seconds a freshly started worker group may take to its first step before a hang is declared."""

    detached_workers: Literal["auto", "on", "off"] = "auto"
    """Rank actors outlive the supervisor's process (detached, named per run/stage/rank) so that a
    supervisor restart touches no training: "auto" is on when the supervisor joins a cluster
    ($RAY_ADDRESS), off in the embedded mode (its own local Ray, which ends with it anyway)."""

    recovery_mode: Literal["auto", "approve", "observe"] = "auto"
    """What a run submitted without its own `recovery_mode` does with a recovery decision: "auto"
    carries it out, "approve" records it as a proposal, holds the run and acts once an operator
    approves, "observe" records the proposal and never acts (README, "Approval modes")."""
    approval_timeout: float | None = Field(None, gt=0.0, le=30 * 86400.0)
    """Approve mode: seconds after which a waiting proposal is carried out as if approved
    (actor "auto-apply"); unset: proposals wait for an operator."""

    host: str = "127.0.0.1"
    """Address the server binds (and advertises in /sd). Loopback unless a proxy or Prometheus
    on another host must reach it."""
    port: int = Field(8700, ge=0, le=65535)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secrets_dir = os.environ.get("TRAINGUARD_SECRETS_DIR")
        if secrets_dir:
            file_secret_settings = SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @field_validator("allowed_data_roots", "allowed_storage", "user_code_modules", "user_code_paths", mode="before")
    @classmethod
    def _list_from_env(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @model_validator(mode="after")
    def _derive_and_check(self) -> "Settings":
        self.state_dir = self.state_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.state_dir / 'trainguard.db'}"
        self._check_tokens()
        self.allowed_data_roots = [_local_root(r, "TRAINGUARD_ALLOWED_DATA_ROOTS") for r in self.allowed_data_roots] \
            or [str(self.state_dir / "data")]
        self.allowed_storage = [_storage_root(r) for r in self.allowed_storage] \
            or [str(self.state_dir / "checkpoints")]
        for m in self.user_code_modules:
            if not _MODULE.match(m):
                raise ValueError(f"TRAINGUARD_USER_CODE_MODULES: {m[:120]!r} is not a dotted module name")
        self.user_code_paths = [_local_root(p, "TRAINGUARD_USER_CODE_PATHS") for p in self.user_code_paths]
        return self

    def _check_tokens(self) -> None:
        # Messages name the variables, never the values.
        tokens = {name: getattr(self, name).get_secret_value() for name in DEV_TOKENS}
        empty = [name for name, value in tokens.items() if not value]
        if empty:
            raise ValueError(f"{_env_names(empty)} must not be empty")
        defaults = [name for name, value in tokens.items() if value == DEV_TOKENS[name]]
        if defaults and self.environment != "development":
            raise ValueError(f"{_env_names(defaults)} still set to the built-in development value; "
                             f"set a secret of at least {MIN_TOKEN_LENGTH} characters "
                             f"(or TRAINGUARD_ENVIRONMENT=development on a laptop)")
        if defaults and not is_loopback(self.host):
            raise ValueError(f"{_env_names(defaults)} still set to the built-in development value while the "
                             f"server binds {self.host!r}, which other machines can reach; set real tokens "
                             f"(at least {MIN_TOKEN_LENGTH} characters) or bind 127.0.0.1")
        short = [name for name, value in tokens.items() if len(value) < MIN_TOKEN_LENGTH]
        if short and self.environment != "development":
            raise ValueError(f"{_env_names(short)} must be at least {MIN_TOKEN_LENGTH} characters outside "
                             f"development (e.g. `openssl rand -hex 32`)")
        if len(set(tokens.values())) != len(tokens):
            raise ValueError("viewer_token, operator_token and webhook_token must differ (the token decides the role)")
        if defaults:
            log.info("using built-in development tokens for %s (loopback only)", ", ".join(defaults))

    def effective_watch_interval(self) -> float:
        """Seconds between watch cycles: `watch_interval`, or on the Prometheus path at most a
        quarter of `prometheus_scrape_interval` (one cheap instant query per cycle for all runs)."""
        if self.prometheus_url:
            return min(self.watch_interval, self.prometheus_scrape_interval / 4.0)
        return self.watch_interval

    def resolved_database_url(self) -> str:
        """The database URL (already derived from state_dir when not set)."""
        return self.database_url


def _env_names(fields: list[str]) -> str:
    return ", ".join(f"TRAINGUARD_{n.upper()}" for n in fields)


def _local_root(value: str, setting: str) -> str:
    """An absolute folder, symlinks resolved (what the access check compares against)."""
    if "://" in value or "::" in value or not os.path.isabs(value):
        raise ValueError(f"{setting}: every entry must be an absolute local folder (got {value!r})")
    return os.path.realpath(value)


def _storage_root(value: str) -> str:
    """A local folder (resolved) or `scheme://bucket[/prefix]` of an object store, without a trailing slash."""
    if "://" not in value:
        return _local_root(value, "TRAINGUARD_ALLOWED_STORAGE")
    scheme, _, rest = value.partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme.lower() not in OBJECT_STORE_SCHEMES:
        raise ValueError(f"TRAINGUARD_ALLOWED_STORAGE: scheme {scheme!r} is not an object store "
                         f"(allowed: {', '.join(sorted(OBJECT_STORE_SCHEMES))})")
    if "::" in value or not bucket or any(c in rest for c in "@?#\\") or "/../" in f"/{rest}/" or "/./" in f"/{rest}/":
        raise ValueError(f"TRAINGUARD_ALLOWED_STORAGE: {value!r} is not a plain {scheme}://bucket/prefix URL")
    return f"{scheme.lower()}://{rest.rstrip('/')}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
