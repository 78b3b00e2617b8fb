"""The supervisor's error taxonomy.

The controller and crud raise these; only `service/api/` turns them into HTTP
statuses (404, 409, 422, 503). `Unavailable` is the one retryable error: the
request was fine, a dependency was not (Alertmanager retries on 5xx only).
"""
from __future__ import annotations

__all__ = ["TrainguardError", "NotFound", "Conflict", "InvalidRequest", "Unavailable"]


class TrainguardError(Exception):
    """Base class; the message is shown to the caller as is."""


class NotFound(TrainguardError):
    """The run / checkpoint / incident named does not exist (or belongs to another run)."""


class Conflict(TrainguardError):
    """The request is well formed but the run's state forbids it (e.g. pausing a completed run)."""


class InvalidRequest(TrainguardError, ValueError):
    """Bad user input that validation at the edge could not see (e.g. an unknown data source)."""


class Unavailable(TrainguardError):
    """A transient failure (Ray, the database, Prometheus); retrying later may succeed."""
