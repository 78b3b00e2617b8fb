"""The FastAPI application factory. The wiring with the real controller is service/app.py."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainguard.service.api.limits import MAX_ERRORS_LISTED, BodyLimit, capped
from trainguard.service.api.ports import ControllerPort
from trainguard.service.api.routes import alerts, ops, runs
from trainguard.service.api.schemas import AlertmanagerPayload, ErrorBody
from trainguard.service.config import Settings
from trainguard.service.db import init_db, make_engine
from trainguard.service.errors import Conflict, InvalidRequest, NotFound, Unavailable
from trainguard.workers.spec import SpecError

__all__ = ["create_app", "API_PREFIX", "ERROR_RESPONSES"]

API_PREFIX = "/api/v1"

# Documented on every route, with the body every error answer has (schemathesis checks both).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request (e.g. a body that is not JSON)"},
    401: {"model": ErrorBody, "description": "Missing or unknown bearer token"},
    403: {"model": ErrorBody, "description": "The token's role may not do this"},
    404: {"model": ErrorBody, "description": "No such run or checkpoint"},
    409: {"model": ErrorBody, "description": "The run's state forbids this"},
    413: {"model": ErrorBody, "description": "Request body over the size limit"},
    422: {"model": ErrorBody, "description": "Invalid value; `detail` names the field"},
    503: {"model": ErrorBody, "description": "A dependency is unavailable; retry later"},
}
_LOC_PARTS, _LOC_CHARS, _MSG_CHARS = 20, 100, 300  # per listed error: an answer stays under 64 KiB


def _where(loc: tuple[Any, ...]) -> str:
    # ("body", "steps") -> "steps"; ("path", "run_id") -> "run_id"; ("query", "limit") -> "limit"
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "path", "query", "header") else [str(p) for p in loc]
    return ".".join(parts) or "body"


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_plain(e) for e in exc.errors()[:MAX_ERRORS_LISTED]]
    message = "; ".join(f"{_where(tuple(e['loc']))}: {e['msg']}" for e in errors)
    if len(exc.errors()) > MAX_ERRORS_LISTED:
        message += f"; ... and {len(exc.errors()) - MAX_ERRORS_LISTED} more"
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": capped(f"invalid request: {message}"), "errors": errors},
    )


def _plain(e: dict[str, Any]) -> dict[str, Any]:
    # Never the input: it may be large, and it is the caller's own anyway.
    loc = [p if isinstance(p, int) else capped(str(p), _LOC_CHARS) for p in e.get("loc", ())][:_LOC_PARTS]
    return {"loc": loc, "msg": capped(str(e.get("msg", "")), _MSG_CHARS), "type": str(e.get("type", ""))}


def _mapped(code: int, headers: dict[str, str] | None = None) -> Callable[[Request, Exception], JSONResponse]:
    def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=code, content={"detail": capped(str(exc))}, headers=headers)

    return handler


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer for HTTPException, with the detail capped."""
    return JSONResponse(status_code=exc.status_code, content={"detail": capped(str(exc.detail))}, headers=exc.headers)


def _openapi_with_alert_schema(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """POST /alerts reads its body by hand (to answer 400, not 422); document the model anyway."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            model = AlertmanagerPayload.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(model.pop("$defs", {}))
            components["AlertmanagerPayload"] = model
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(
    settings: Settings,
    controller: ControllerPort,
    *,
    engine: Engine | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None,
) -> FastAPI:
    """The REST API over `controller`.

    `engine`: share the controller's engine (already migrated); without one, an
    engine for settings.database_url is made and migrated here. `lifespan`: the
    scheduler wiring (service/scheduler.py) plugs in here."""
    if engine is None:
        engine = init_db(make_engine(settings.database_url))
    app = FastAPI(
        title="trainguard",
        version="0.1.0",
        description="Training-run monitoring and recovery: runs, checkpoints, incidents, control.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.controller = controller

    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(NotFound, _mapped(status.HTTP_404_NOT_FOUND))
    app.add_exception_handler(Conflict, _mapped(status.HTTP_409_CONFLICT))
    # Both carry a message naming the field. Other ValueErrors are bugs: 500.
    app.add_exception_handler(SpecError, _mapped(status.HTTP_422_UNPROCESSABLE_CONTENT))
    app.add_exception_handler(InvalidRequest, _mapped(status.HTTP_422_UNPROCESSABLE_CONTENT))
    app.add_exception_handler(Unavailable, _mapped(status.HTTP_503_SERVICE_UNAVAILABLE, {"Retry-After": "5"}))

    app.include_router(runs.router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(alerts.router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(ops.api_router, prefix=API_PREFIX, responses=ERROR_RESPONSES)
    app.include_router(ops.root_router, responses=ERROR_RESPONSES)
    app.openapi = _openapi_with_alert_schema(app)  # type: ignore[method-assign]
    return app
