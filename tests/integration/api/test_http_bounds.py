"""Bounded work over real HTTP: what a pipeline may reach, body limits, no 500 for any input,
small error answers. Every rejected request leaves the store as it was (see `_rejected`)."""
from __future__ import annotations

import json

import pytest

from tests.integration.api.conftest import BUCKET, OPERATOR, VIEWER, WEBHOOK
from tests.integration.api.test_http import SPEC, _alert_payload, _rejected, _submit

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _stage(storage: str) -> dict:
    return {**SPEC, "stages": [SPEC["stages"][0], {**SPEC["stages"][1], "checkpoint": {"storage": storage}}]}


# --- what a pipeline may reach ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, field",
    [
        ({**SPEC, "data": {"docs": "/etc/passwd"}}, "data.docs"),
        ({**SPEC, "data": {"docs": "/data/../etc/passwd"}}, "data.docs"),
        ({**SPEC, "checkpoint": {"storage": "/tmp/elsewhere"}}, "checkpoint.storage"),
        ({**SPEC, "checkpoint": {"storage": "http://169.254.169.254/latest"}}, "checkpoint.storage"),
        (_stage("simplecache::" + BUCKET), "stages.1.checkpoint.storage"),
        (_stage("github://org:repo@main/"), "stages.1.checkpoint.storage"),
        (_stage("s3://another-bucket/x"), "stages.1.checkpoint.storage"),
    ],
)
def test_pipelines_reaching_outside_the_allowed_roots_are_422_naming_the_field(api, spec, field):
    _rejected(api, "POST", "/api/v1/runs", json={"spec": spec}, status=422, match=f"{field}: ")


def test_allowed_data_and_bucket_storage_are_accepted(api):
    run = _submit(api, {**_stage(f"{BUCKET}/sft"), "data": {"docs": "/data/corpora/docs.txt"}})
    assert run["spec"]["stages"][1]["checkpoint"]["storage"] == f"{BUCKET}/sft"


def test_the_answer_is_the_same_whether_the_path_exists(api):
    there = _rejected(api, "POST", "/api/v1/runs", json={"spec": {**SPEC, "data": {"docs": "/etc/hostname"}}},
                      status=422, match="data.docs")
    absent = _rejected(api, "POST", "/api/v1/runs", json={"spec": {**SPEC, "data": {"docs": "/etc/hostnamX"}}},
                       status=422, match="data.docs")
    assert there.replace("hostname", "X") == absent.replace("hostnamX", "X")


# --- request bodies ---------------------------------------------------------------------------------


def test_a_body_over_one_mib_is_413(api):
    body = json.dumps({"yaml": "x" * (MIB + 10)})
    _rejected(api, "POST", "/api/v1/runs", content=body, headers={"content-type": "application/json"},
              status=413, match="request body larger than 1048576 bytes")


def test_a_streamed_body_without_content_length_is_counted(api):
    def chunks():
        yield b'{"yaml": "'
        for _ in range(20):
            yield b"x" * (64 * 1024)
        yield b'"}'

    _rejected(api, "POST", "/api/v1/runs", content=chunks(), headers={"content-type": "application/json"},
              status=413, match="request body larger")
    _rejected(api, "POST", "/api/v1/alerts", token=WEBHOOK, content=chunks(),
              headers={"content-type": "application/json"}, status=413, match="request body larger")


# --- inputs that made 500s ------------------------------------------------------------------------


def test_yaml_nested_a_thousand_deep_is_422(api):
    deep = "name: x\nstages: " + "[" * 1000 + "]" * 1000 + "\n"
    _rejected(api, "POST", "/api/v1/runs", json={"yaml": deep}, status=422, match="nested too deeply")


def test_an_alert_nested_100k_deep_is_400_so_alertmanager_does_not_retry(api):
    body = '{"version": "4", "alerts": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _rejected(api, "POST", "/api/v1/alerts", token=WEBHOOK, content=body,
              headers={"content-type": "application/json"}, status=400, match="nested too deeply")


def test_an_offset_the_database_cannot_take_is_422(api):
    run = _submit(api)
    for suffix in ("", f"/{run['id']}/checkpoints", f"/{run['id']}/incidents", f"/{run['id']}/events"):
        for offset in (2**63, 2**31):
            _rejected(api, "GET", "/api/v1/runs" + suffix, token=VIEWER, params={"offset": offset},
                      status=422, match="offset")


def test_a_checkpoint_id_the_database_cannot_take_is_422(api):
    run = _submit(api)
    _rejected(api, "POST", f"/api/v1/runs/{run['id']}/rollback", json={"checkpoint_id": 2**63},
              status=422, match="checkpoint_id")


# --- small error answers --------------------------------------------------------------------------


def _error_size(api, method, path, *, token=OPERATOR, status, **kw) -> int:
    with api.client(token) as c:
        r = c.request(method, path, **kw)
    assert r.status_code == status, r.text[:500]
    assert isinstance(r.json()["detail"], str)
    return len(r.content)


def test_a_spec_with_a_hundred_thousand_bad_stages_gets_a_small_answer(api):
    body = {"spec": {"name": "x", "stages": [{}] * 100_000}}
    assert _error_size(api, "POST", "/api/v1/runs", json=body, status=422) < 64 * 1024


def test_a_request_with_many_invalid_fields_gets_a_small_answer(api):
    run = _submit(api)
    body = {"steps": 5, "final_lr": 0.1, "mixture": {f"s{i}": "heavy" for i in range(50_000)}}
    size = _error_size(api, "POST", f"/api/v1/runs/{run['id']}/anneal", json=body, status=422)
    assert size < 64 * 1024


def test_a_huge_unknown_key_is_not_echoed_whole(api):
    body = {"spec": {**SPEC, "k" * 900_000: 1}}
    assert _error_size(api, "POST", "/api/v1/runs", json=body, status=422) < 64 * 1024
    alert = {**_alert_payload(), "version": "4" * 900_000}
    assert _error_size(api, "POST", "/api/v1/alerts", token=WEBHOOK, json=alert, status=400) < 64 * 1024
