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

from trainguard.service.api.deps import ControllerDep, WebhookDep
from trainguard.service.api.limits import MAX_ERRORS_LISTED, capped
from trainguard.service.api.schemas import AlertmanagerPayload, AlertsResult
from trainguard.service.errors import Conflict, InvalidRequest, NotFound, Unavailable

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
    except RecursionError:  # nested beyond the interpreter's limit: still the sender's fault, so 4xx
        raise _bad_request("alert payload is nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad_request("alert payload must be a JSON object")
    if data.get("version") != "4":
        shown = capped(repr(data.get("version")), 100)
        raise _bad_request(f"unsupported Alertmanager payload version {shown} (expected \"4\")")
    try:
        return AlertmanagerPayload.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        problems = "; ".join(f"{capped('.'.join(map(str, err['loc'])), 200)}: {err['msg']}"
                             for err in errors[:MAX_ERRORS_LISTED])
        more = f"; ... and {len(errors) - MAX_ERRORS_LISTED} more" if len(errors) > MAX_ERRORS_LISTED else ""
        raise _bad_request(f"malformed Alertmanager payload: {problems}{more}") from None
    except RecursionError:
        raise _bad_request("alert payload is nested too deeply") from None


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
