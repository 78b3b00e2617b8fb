"""The REST API over real HTTP: auth, validation at the edge, error mapping, the Alertmanager receiver.

Every rejected request is checked twice: the answer names the problem, and the
store is byte-for-byte what it was (and the controller was never called)."""
from __future__ import annotations

import copy
import json

import pytest
from sqlmodel import Session

from trainguard.service.db import crud
from trainguard.service.errors import Conflict, InvalidRequest, NotFound, Unavailable
from tests.integration.api.conftest import OPERATOR, VIEWER, WEBHOOK

pytestmark = pytest.mark.integration

SPEC = {
    "name": "tiny",
    "data": {"docs": "/data/docs.txt"},
    "stages": [
        {"name": "pretrain", "kind": "pretrain", "steps": 60},
        {"name": "sft", "kind": "sft", "steps": 20},
    ],
}
YAML = """
name: tiny-yaml
stages:
  - {name: pretrain, kind: pretrain, steps: 40}
"""


def _submit(api, spec=SPEC) -> dict:
    with api.client(OPERATOR) as c:
        r = c.post("/api/v1/runs", json={"spec": spec})
    assert r.status_code == 201, r.text
    return r.json()


def _rejected(api, method, path, *, token=OPERATOR, status, match, **kw):
    """Send a request that must fail; return its detail."""
    before = api.snapshot()
    calls = len(api.controller.calls)
    with api.client(token) as c:
        r = c.request(method, path, **kw)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for m in [match] if isinstance(match, str) else match:
        assert m in detail, detail
    assert api.snapshot() == before, "a rejected request changed the store"
    assert len(api.controller.calls) == calls, "a rejected request reached the controller"
    return detail


# --- served documents and probes ---------------------------------------------------------------


def test_openapi_documents_every_error_answer_with_its_body(api):
    with api.client() as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["ErrorBody"]["required"]) == {"detail"} and "HTTPValidationError" not in schemas
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for code in ("400", "401", "403", "404", "409", "413", "422"):
                body = op["responses"][code]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    with api.client(VIEWER) as c:
        r = c.get("/api/v1/runs", params={"limit": 0})
    assert r.status_code == 422 and set(r.json()) == {"detail", "errors"}  # the documented shape
    assert [(e["loc"], e["type"]) for e in r.json()["errors"]] == [(["query", "limit"], "greater_than_equal")]


def test_openapi_health_ready_and_metrics_are_served(api):
    with api.client() as c:
        doc = c.get("/openapi.json").json()
        assert "/api/v1/runs/{run_id}/anneal" in doc["paths"] and "/api/v1/alerts" in doc["paths"]
        assert "AlertmanagerPayload" in doc["components"]["schemas"]
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200
        m = c.get("/metrics")
        assert m.status_code == 200 and "trainguard_up 1.0" in m.text
        assert m.headers["content-type"].startswith("text/plain")


def test_readyz_is_503_while_the_controller_is_not_ready(api):
    api.controller.is_ready = False
    with api.client() as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"database": True, "controller": False}


# --- auth ---------------------------------------------------------------------------------------


def test_no_token_is_401_with_www_authenticate(api):
    with api.client() as c:
        r = c.get("/api/v1/runs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in r.json()["detail"]


def test_unknown_token_is_401(api):
    _rejected(api, "GET", "/api/v1/runs", token="guess", status=401, match="invalid bearer token")


def test_viewer_reads_but_may_not_control(api):
    run = _submit(api)
    with api.client(VIEWER) as c:
        assert c.get(f"/api/v1/runs/{run['id']}").status_code == 200
    for action in ("pause", "resume", "stop", "rollback"):
        _rejected(api, "POST", f"/api/v1/runs/{run['id']}/{action}", token=VIEWER, status=403, match="viewer token may not")
    _rejected(api, "POST", "/api/v1/runs", token=VIEWER, json={"spec": SPEC}, status=403, match="needs operator")


def test_webhook_token_only_opens_alerts(api):
    _rejected(api, "GET", "/api/v1/runs", token=WEBHOOK, status=403, match="webhook token may not")
    _rejected(api, "POST", "/api/v1/alerts", token=None, json=_alert_payload(), status=401, match="missing bearer token")
    _rejected(api, "POST", "/api/v1/alerts", token=OPERATOR, json=_alert_payload(), status=403, match="needs webhook")


def test_sd_needs_the_viewer_token(api):
    _rejected(api, "GET", "/api/v1/sd", token=None, status=401, match="missing bearer token")
    with api.client(VIEWER) as c:
        targets = c.get("/api/v1/sd").json()
    assert targets[0]["targets"] == ["127.0.0.1:1234"] and targets[0]["labels"]["rank"] == "0"


# --- submit ---------------------------------------------------------------------------------------


def test_submit_stores_the_run_with_its_stages_and_passes_the_actor(api):
    run = _submit(api)
    assert run["id"].startswith("run-") and run["state"] == "pending"
    assert [s["name"] for s in run["stages"]] == ["pretrain", "sft"]
    assert run["spec"]["stages"][0]["steps"] == 60
    name, (spec,), kw = api.controller.calls[-1]
    assert name == "submit" and spec.name == "tiny" and kw == {"actor": "operator"}


def test_submit_accepts_yaml_text(api):
    with api.client(OPERATOR) as c:
        r = c.post("/api/v1/runs", json={"yaml": YAML})
    assert r.status_code == 201 and r.json()["name"] == "tiny-yaml"


@pytest.mark.parametrize(
    "body, match",
    [
        ({"spec": {**SPEC, "stages": [{"name": "pretrain", "kind": "pretrain", "steps": -5}]}}, "stages.0.pretrain.steps"),
        ({"spec": {**SPEC, "stages": []}}, "stages"),
        ({"spec": {**SPEC, "stages": [{"name": "x", "kind": "warp", "steps": 5}]}}, "stages.0"),
        ({"spec": {**SPEC, "learning_rate": 3}}, "learning_rate"),
        ({"spec": SPEC, "yaml": YAML}, "exactly one"),
        ({}, "exactly one"),
        ({"yaml": "name: [unclosed"}, "not valid YAML"),
        ({"yaml": "- just\n- a list\n"}, "must be a mapping"),
        ({"yaml": "/etc/passwd"}, "must be a mapping"),  # never read as a server-side path
        ({"spec": "name: tiny"}, "spec"),
        ({"specs": SPEC}, "specs"),
    ],
)
def test_invalid_submissions_are_422_naming_the_field(api, body, match):
    _rejected(api, "POST", "/api/v1/runs", json=body, status=422, match=match)


def test_submit_body_that_is_not_json_is_422(api):
    _rejected(api, "POST", "/api/v1/runs", content=b"{nope", headers={"content-type": "application/json"},
              status=422, match="JSON")


# --- run ids at the edge ------------------------------------------------------------------------


@pytest.mark.parametrize("method, suffix", [("GET", ""), ("POST", "/pause"), ("POST", "/stop"), ("GET", "/events")])
def test_unknown_run_is_404(api, method, suffix):
    _rejected(api, method, f"/api/v1/runs/run-0123456789ab{suffix}", status=404, match="run run-0123456789ab not found")


@pytest.mark.parametrize(
    "raw, status",
    [
        ("run-XYZ", 422),
        ("run-0123456789abc", 422),
        ("run-..%2F..", 404),  # the slash splits the path: no route
        ("..%2Fx", 404),
        ("run-0123456789ab%00", 422),
        ("%2E%2E", 422),
    ],
)
def test_path_like_or_malformed_run_ids_are_rejected(api, raw, status):
    for method, suffix in (("GET", ""), ("POST", "/pause"), ("POST", "/rollback")):
        detail = _rejected(api, method, f"/api/v1/runs/{raw}{suffix}", status=status, match=[])
        assert ("run_id" in detail) if status == 422 else detail == "Not Found"


# --- control --------------------------------------------------------------------------------------


def test_pause_resume_stop_reach_the_controller_with_the_actor(api):
    run = _submit(api)
    with api.client(OPERATOR) as c:
        for action in ("pause", "resume", "stop"):
            r = c.post(f"/api/v1/runs/{run['id']}/{action}")
            assert r.status_code == 202 and r.json()["id"] == run["id"]
    assert [(n, a, kw) for n, a, kw in api.controller.calls[-3:]] == [
        (n, (run["id"],), {"actor": "operator"}) for n in ("pause", "resume", "stop")
    ]


@pytest.mark.parametrize(
    "exc, status",
    [(Conflict("cannot pause run in state 'completed'"), 409), (NotFound("gone"), 404),
     (InvalidRequest("bad mixture"), 422), (Unavailable("ray is down"), 503)],
)
def test_controller_errors_map_to_statuses_with_their_message(api, exc, status):
    run = _submit(api)
    api.controller.fail_with = exc
    with api.client(OPERATOR) as c:
        r = c.post(f"/api/v1/runs/{run['id']}/pause")
    assert r.status_code == status and r.json()["detail"] == str(exc)
    if status == 503:
        assert r.headers["retry-after"] == "5"


def test_anneal_passes_validated_values(api):
    run = _submit(api)
    with api.client(OPERATOR) as c:
        r = c.post(f"/api/v1/runs/{run['id']}/anneal",
                   json={"steps": 200, "final_lr": 1e-5, "schedule": "cosine", "mixture": {"curated": 0.9, "docs": 0.1}})
    assert r.status_code == 202, r.text
    assert api.controller.calls[-1] == (
        "anneal", (run["id"],),
        {"steps": 200, "final_lr": 1e-5, "schedule": "cosine", "mixture": {"curated": 0.9, "docs": 0.1}, "actor": "operator"},
    )


GOOD_ANNEAL = {"steps": 100, "final_lr": 0.0001, "schedule": "linear"}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"steps": -1}, "steps"),
        ({"steps": 0}, "steps"),
        ({"steps": 10**9}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"final_lr": -0.1}, "final_lr"),
        ({"final_lr": 50.0}, "final_lr"),
        ({"final_lr": "fast"}, "final_lr"),
        ({"schedule": "square"}, "schedule"),
        ({"mixture": {}}, "mixture"),
        ({"mixture": {"web": -1.0}}, "mixture"),
        ({"mixture": {"web": 1e300}}, "mixture"),
        ({"mixture": {"web": 0.0, "curated": 0.0}}, "sum to zero"),
        ({"mixture": {"reddit": 1.0}}, "unknown source"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_absurd_anneal_parameters_are_422_naming_the_field(api, change, match):
    run = _submit(api)
    body = {**GOOD_ANNEAL, **change}
    _rejected(api, "POST", f"/api/v1/runs/{run['id']}/anneal", json=body, status=422, match=match)


def test_anneal_nan_is_rejected(api):
    run = _submit(api)
    raw = json.dumps({**GOOD_ANNEAL, "final_lr": float("nan")}).encode()  # Python writes the NaN token
    _rejected(api, "POST", f"/api/v1/runs/{run['id']}/anneal", content=raw,
              headers={"content-type": "application/json"}, status=422, match="final_lr")


def _checkpoint(api, run_id, step=20) -> int:
    with Session(api.engine) as s:
        return crud.upsert_checkpoint(s, run_id=run_id, stage_name="pretrain", step=step, batch_cursor=step,
                                      path=f"/ck/{run_id}/{step}", verified=True, healthy=True).id


def test_rollback_to_own_checkpoint_and_to_default(api):
    run = _submit(api)
    ckpt = _checkpoint(api, run["id"])
    with api.client(OPERATOR) as c:
        r = c.post(f"/api/v1/runs/{run['id']}/rollback", json={"checkpoint_id": ckpt})
        assert r.status_code == 202, r.text
        assert r.json() == {"run_id": run["id"], "incident_id": 7, "target_step": 40, "action": "rollback",
                            "incident": 7, "rollback_to_step": 40}
        assert c.post(f"/api/v1/runs/{run['id']}/rollback").status_code == 202
    assert [kw["checkpoint_id"] for n, _, kw in api.controller.calls if n == "rollback"] == [ckpt, None]


def test_rollback_lets_the_operator_choose_skip_and_lr_within_bounds(api):
    run = _submit(api)
    with api.client(OPERATOR) as c:
        assert c.post(f"/api/v1/runs/{run['id']}/rollback", json={}).status_code == 202
        r = c.post(f"/api/v1/runs/{run['id']}/rollback", json={"skip": False, "lr_multiplier": 0.8})
        assert r.status_code == 202, r.text
    calls = [kw for n, _, kw in api.controller.calls if n == "rollback"]
    assert calls == [
        {"checkpoint_id": None, "skip": True, "lr_multiplier": None, "actor": "operator"},
        {"checkpoint_id": None, "skip": False, "lr_multiplier": 0.8, "actor": "operator"},
    ]
    for change in ({"lr_multiplier": 0}, {"lr_multiplier": -0.5}, {"lr_multiplier": 1.5}, {"lr_multiplier": "half"},
                   {"skip": "sometimes"}):
        _rejected(api, "POST", f"/api/v1/runs/{run['id']}/rollback", json=change, status=422,
                  match=next(iter(change)))


def test_rollback_to_a_deleted_checkpoint_is_409(api):
    run = _submit(api)
    ckpt = _checkpoint(api, run["id"])
    with Session(api.engine) as s:
        crud.mark_checkpoint_deleted(s, checkpoint=crud.get_checkpoint(s, run_id=run["id"], checkpoint_id=ckpt))
    _rejected(api, "POST", f"/api/v1/runs/{run['id']}/rollback", json={"checkpoint_id": ckpt},
              status=409, match=f"checkpoint {ckpt} was deleted")


def test_rollback_to_another_runs_checkpoint_is_404(api):
    mine, other = _submit(api), _submit(api)
    theirs = _checkpoint(api, other["id"])
    _rejected(api, "POST", f"/api/v1/runs/{mine['id']}/rollback", json={"checkpoint_id": theirs},
              status=404, match=f"checkpoint {theirs} not found in run {mine['id']}")


@pytest.mark.parametrize("cid", ["abc", -3, 0, 1.5, "../../etc"])
def test_rollback_with_a_malformed_checkpoint_id_is_422(api, cid):
    run = _submit(api)
    _rejected(api, "POST", f"/api/v1/runs/{run['id']}/rollback", json={"checkpoint_id": cid}, status=422,
              match="checkpoint_id")


# --- reads ----------------------------------------------------------------------------------------


def test_lists_read_the_store(api):
    run = _submit(api)
    ckpt = _checkpoint(api, run["id"], step=40)
    with Session(api.engine) as s:
        crud.create_incident(s, run_id=run["id"], stage_name="pretrain", kind="loss_spike", onset_step=33,
                             detected_at_step=35, source="alert", dedup_key=f"{run['id']}:spike:33")
        crud.set_run_state(s, run=crud.get_run(s, run_id=run["id"]), state="running", actor="supervisor", reason="go")
    with api.client(VIEWER) as c:
        cks = c.get(f"/api/v1/runs/{run['id']}/checkpoints").json()
        incs = c.get(f"/api/v1/runs/{run['id']}/incidents").json()
        evs = c.get(f"/api/v1/runs/{run['id']}/events").json()
        running = c.get("/api/v1/runs", params={"state": "running"}).json()
        page = c.get("/api/v1/runs", params={"limit": 1, "offset": 0}).json()
    assert [c_["id"] for c_ in cks["data"]] == [ckpt]
    assert incs["data"][0]["kind"] == "loss_spike" and incs["data"][0]["detected_at"].endswith(("Z", "+00:00"))
    assert [e["kind"] for e in evs["data"]] == ["submitted", "state"]
    assert run["id"] in [r["id"] for r in running["data"]]
    assert len(page["data"]) == 1 and page["count"] >= 1


def test_checkpoints_list_live_ones_unless_all_is_asked(api):
    run = _submit(api)
    ids = [_checkpoint(api, run["id"], step=step) for step in (20, 40, 60, 80)]
    with Session(api.engine) as s:
        for cid in ids[:2]:  # retention deleted the two oldest
            crud.mark_checkpoint_deleted(s, checkpoint=crud.get_checkpoint(s, run_id=run["id"], checkpoint_id=cid))
    with api.client(VIEWER) as c:
        live = c.get(f"/api/v1/runs/{run['id']}/checkpoints").json()
        history = c.get(f"/api/v1/runs/{run['id']}/checkpoints", params={"all": "true"}).json()
        page = c.get(f"/api/v1/runs/{run['id']}/checkpoints", params={"all": "true", "limit": 1, "offset": 1}).json()
    assert [ck["id"] for ck in live["data"]] == ids[2:] and live["count"] == 2
    assert all(ck["deleted_at"] is None and ck["healthy"] for ck in live["data"])
    assert [ck["id"] for ck in history["data"]] == ids and history["count"] == 4
    assert history["data"][0]["deleted_at"] is not None and history["data"][0]["healthy"]  # gone, not unhealthy
    assert [ck["id"] for ck in page["data"]] == [ids[1]] and page["count"] == 4


def test_incidents_and_events_are_pages_with_the_total_count(api):
    run = _submit(api)
    with Session(api.engine) as s:
        for i in range(3):
            crud.create_incident(s, run_id=run["id"], stage_name="pretrain", kind="hang", onset_step=i,
                                 detected_at_step=i, dedup_key=f"{run['id']}:hang:{i}")
        for i in range(150):
            crud.add_event(s, run_id=run["id"], actor="supervisor", kind="tick", detail={"i": i}, result="ok")
    with api.client(VIEWER) as c:
        incs = c.get(f"/api/v1/runs/{run['id']}/incidents", params={"limit": 2, "offset": 1}).json()
        events = c.get(f"/api/v1/runs/{run['id']}/events").json()
        last = c.get(f"/api/v1/runs/{run['id']}/events", params={"limit": 1000, "offset": 150}).json()
    assert [i["onset_step"] for i in incs["data"]] == [1, 2] and incs["count"] == 3
    assert len(events["data"]) == 100 and events["count"] == 151  # "submitted" + 150
    assert [e["detail"]["i"] for e in last["data"]] == [149]


def test_run_lists_have_bounded_pages(api):
    run = _submit(api)
    for suffix in ("/checkpoints", "/incidents", "/events"):
        for params, match in (({"limit": 1001}, "limit"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset")):
            _rejected(api, "GET", f"/api/v1/runs/{run['id']}{suffix}", token=VIEWER, params=params, status=422,
                      match=match)


@pytest.mark.parametrize("params, match", [({"state": "exploded"}, "state"), ({"limit": 0}, "limit"),
                                           ({"limit": 10**6}, "limit"), ({"offset": -1}, "offset")])
def test_bad_list_parameters_are_422(api, params, match):
    _rejected(api, "GET", "/api/v1/runs", token=VIEWER, params=params, status=422, match=match)


# --- Alertmanager ---------------------------------------------------------------------------------


def _alert_payload(**override) -> dict:
    p = {
        "version": "4",
        "groupKey": '{}:{alertname="TrainguardLossSpike"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "trainguard",
        "groupLabels": {"alertname": "TrainguardLossSpike"},
        "commonLabels": {"alertname": "TrainguardLossSpike", "run": "run-0123456789ab"},
        "commonAnnotations": {"summary": "loss spike"},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "TrainguardLossSpike", "run": "run-0123456789ab", "stage": "pretrain",
                       "trainguard_kind": "loss_spike"},
            "annotations": {"summary": "loss spike"},
            "startsAt": "2026-01-01T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": "0123456789abcdef",
        }],
    }
    p.update(override)
    return p


def test_alert_payload_reaches_the_controller_parsed(api):
    with api.client(WEBHOOK) as c:
        r = c.post("/api/v1/alerts", json=_alert_payload())
    assert r.status_code == 200 and r.json() == {"created": 1, "merged": 0, "resolved": 0, "ignored": 0}
    name, (payload,), kw = api.controller.calls[-1]
    assert name == "handle_alerts" and kw == {"actor": "webhook"}
    assert payload.alerts[0].fingerprint == "0123456789abcdef" and payload.alerts[0].labels["trainguard_kind"] == "loss_spike"


def _broken_alert():
    p = _alert_payload()
    p["alerts"] = copy.deepcopy(p["alerts"])
    del p["alerts"][0]["fingerprint"]
    return p


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"json": _alert_payload(version="3")}, "version '3'"),
        ({"json": {k: v for k, v in _alert_payload().items() if k != "alerts"}}, "alerts"),
        ({"json": _alert_payload(status="exploding")}, "status"),
        ({"json": _broken_alert()}, "alerts.0.fingerprint"),
        ({"json": [1, 2]}, "JSON object"),
        ({"content": b"not json", "headers": {"content-type": "application/json"}}, "not JSON"),
    ],
)
def test_malformed_alert_payloads_are_400(api, kw, match):
    _rejected(api, "POST", "/api/v1/alerts", token=WEBHOOK, status=400, match=match, **kw)


@pytest.mark.parametrize("exc, status", [(Unavailable("database locked"), 503), (RuntimeError("ray hiccup"), 503),
                                         (InvalidRequest("no such kind"), 400)])
def test_alert_handling_failures_tell_alertmanager_whether_to_retry(api, exc, status):
    api.controller.fail_with = exc
    with api.client(WEBHOOK) as c:
        r = c.post("/api/v1/alerts", json=_alert_payload())
    assert r.status_code == status and str(exc) in r.json()["detail"]
