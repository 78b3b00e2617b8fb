"""Operational endpoints: Prometheus HTTP SD (under /api/v1) and /metrics, /healthz, /readyz (root)."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response, status
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from sqlalchemy import text

from trainguard.service.api.deps import ControllerDep, Principal, SessionDep, require_viewer_for

api_router = APIRouter(tags=["discovery"])
root_router = APIRouter(tags=["ops"])


@api_router.get("/sd")
def service_discovery(
    _: Annotated[Principal | None, Depends(require_viewer_for("sd_requires_auth"))], controller: ControllerDep
) -> list[dict[str, Any]]:
    """Prometheus `http_sd_configs` targets: every live worker's /metrics, labelled run/stage/rank.

    Asks for the viewer token unless TRAINGUARD_SD_REQUIRES_AUTH=false; in
    prometheus.yml: `authorization: {credentials_file: ...}` under the http_sd_config."""
    return controller.sd_targets()


class Readiness(BaseModel):
    status: str  # "ready" | "not ready"
    checks: dict[str, bool]


_METRICS_DOC = {200: {"description": "Prometheus text exposition format",
                      "content": {"text/plain": {"schema": {"type": "string"}}}}}
_READY_DOC = {503: {"model": Readiness, "description": "The store or the controller is not ready"}}


@root_router.get("/metrics", response_class=Response, responses=_METRICS_DOC)
def metrics(
    _: Annotated[Principal | None, Depends(require_viewer_for("metrics_requires_auth"))], controller: ControllerDep
) -> Response:
    return Response(controller.metrics_text(), media_type=CONTENT_TYPE_LATEST)


@root_router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


@root_router.get("/readyz", response_model=Readiness, responses=_READY_DOC)
def readyz(session: SessionDep, controller: ControllerDep, response: Response) -> Readiness:
    """The store answers and the controller is ready (readiness)."""
    checks: dict[str, bool] = {}
    try:
        session.exec(text("select 1"))  # type: ignore[call-overload]
        checks["database"] = True
    except Exception:  # noqa: BLE001 - any failure means not ready
        checks["database"] = False
    try:
        checks["controller"] = bool(controller.ready())
    except Exception:  # noqa: BLE001
        checks["controller"] = False
    ok = all(checks.values())
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="ready" if ok else "not ready", checks=checks)
