"""Annotated dependencies: the session, the controller, the caller's role, the run in the path.

The settings, controller and role checks are `async def`: they only compare tokens and read
app state, so they run on the event loop instead of costing a threadpool hop each per request.
The session stays a sync dependency (closing it may wait on the database).

Roles: viewer < operator (operator may also read). The webhook token is valid
for POST /alerts only. A missing or unknown token is 401 (with
WWW-Authenticate); a known token without the role is 403.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from trainguard.service.api.ports import ControllerPort
from trainguard.service.config import Settings
from trainguard.service.db import crud
from trainguard.service.db.models import RUN_ID_PATTERN, Run

__all__ = [
    "Principal",
    "SessionDep",
    "SettingsDep",
    "ControllerDep",
    "ViewerDep",
    "OperatorDep",
    "WebhookDep",
    "RunIdPath",
    "RunDep",
    "require_viewer_for",
]

_bearer = HTTPBearer(auto_error=False, description="viewer, operator or webhook token")


@dataclass(frozen=True)
class Principal:
    role: str  # "viewer" | "operator" | "webhook"

    @property
    def actor(self) -> str:
        """What the event log records as who did it: the role the token grants."""
        return self.role


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


async def get_controller(request: Request) -> ControllerPort:
    return request.app.state.controller


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ControllerDep = Annotated[ControllerPort, Depends(get_controller)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"})


def _role_of(settings: Settings, token: str) -> str | None:
    found = None
    for role in ("viewer", "operator", "webhook"):
        expected = getattr(settings, f"{role}_token").get_secret_value().encode()
        # compare every token (no early exit): timing reveals nothing about which one is close
        if secrets.compare_digest(token.encode(), expected):
            found = role
    return found


def _authorize(settings: Settings, creds: HTTPAuthorizationCredentials | None, allowed: tuple[str, ...]) -> Principal:
    if creds is None or not creds.credentials:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    role = _role_of(settings, creds.credentials)
    if role is None:
        raise _unauthorized("invalid bearer token")
    if role not in allowed:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"the {role} token may not do this (needs {' or '.join(allowed)})")
    return Principal(role)


async def require_viewer(settings: SettingsDep, creds: Credentials) -> Principal:
    return _authorize(settings, creds, ("viewer", "operator"))


async def require_operator(settings: SettingsDep, creds: Credentials) -> Principal:
    return _authorize(settings, creds, ("operator",))


async def require_webhook(settings: SettingsDep, creds: Credentials) -> Principal:
    return _authorize(settings, creds, ("webhook",))


def require_viewer_for(setting: str):
    """A dependency asking for the viewer token only while `settings.<setting>` is true."""

    async def dep(settings: SettingsDep, creds: Credentials) -> Principal | None:
        if not getattr(settings, setting):
            return None
        return _authorize(settings, creds, ("viewer", "operator"))

    return dep


ViewerDep = Annotated[Principal, Depends(require_viewer)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
WebhookDep = Annotated[Principal, Depends(require_webhook)]

RunIdPath = Annotated[str, Path(pattern=RUN_ID_PATTERN, description="run-<12 hex digits>", examples=["run-0123456789ab"])]


def get_run_or_404(run_id: RunIdPath, session: SessionDep) -> Run:
    run = crud.get_run(session, run_id=run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"run {run_id} not found")
    return run


RunDep = Annotated[Run, Depends(get_run_or_404)]
