"""POST /api/v1/alerts: the Alertmanager webhook receiver.

Alertmanager retries 5xx and drops 4xx, so: a payload we cannot read is 400
(retrying will not fix it), a controller that could not act is 503 (it may next
time), and once stored the answer is 200. The controller de-duplicates on group
key and alert fingerprint, so a retried delivery changes nothing.
"""
from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import ValidationError

from service.api.deps import ControllerDep, WebhookDep
from service.api.schemas import AlertmanagerPayload, AlertsResult
from service.errors import Conflict, InvalidRequest, NotFound, Unavailable

log = logging.getLogger(__name__)
router = APIRouter(tags=["alerts"])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AlertmanagerPayload"}}},
    }
}


def _bad_request(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail=detail)


def _parse(raw: bytes) -> AlertmanagerPayload:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise _bad_request(f"alert payload is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise _bad_request("alert payload must be a JSON object")
    if data.get("version") != "4":
        raise _bad_request(f"unsupported Alertmanager payload version {data.get('version')!r} (expected \"4\")")
    try:
        return AlertmanagerPayload.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise _bad_request(f"malformed Alertmanager payload: {problems}") from None


@router.post("/alerts", response_model=AlertsResult, openapi_extra=_BODY_DOC)
async def receive_alerts(principal: WebhookDep, request: Request, controller: ControllerDep):
    # Parsed by hand so a malformed payload is 400, not FastAPI's 422.
    payload = _parse(await request.body())
    try:
        counts = await _in_thread(controller.handle_alerts, payload, actor=principal.actor)
    except (InvalidRequest, NotFound, Conflict) as e:
        raise _bad_request(str(e)) from None
    except Unavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(e), headers={"Retry-After": "5"}) from None
    except Exception as e:  # noqa: BLE001 - anything else may be transient: let Alertmanager retry
        log.exception("handling alerts failed")
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"could not handle alerts: {e}", headers={"Retry-After": "5"}
        ) from None
    return AlertsResult.model_validate(counts)


async def _in_thread(fn, *args, **kwargs):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args, **kwargs)
