"""Request bodies: anneal limits, the Alertmanager v4 payload, rollback answers."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainguard.service.api.schemas import AlertmanagerPayload, AnnealRequest, RollbackAccepted, RollbackRequest


def test_anneal_defaults_and_known_sources():
    a = AnnealRequest(steps=10, final_lr=0.0)
    assert a.schedule == "linear" and a.mixture is None
    b = AnnealRequest(steps=10, final_lr=1e-5, mixture={"curated": 1.0, "docs": 0.0})
    assert b.unknown_sources({"curated", "web"}) == ["docs"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"steps": 0, "final_lr": 0.1}, "steps"),
        ({"steps": 1_000_001, "final_lr": 0.1}, "steps"),
        ({"steps": 5, "final_lr": -1e-9}, "final_lr"),
        ({"steps": 5, "final_lr": 1.5}, "final_lr"),
        ({"steps": 5, "final_lr": float("inf")}, "final_lr"),
        ({"steps": 5, "final_lr": float("nan")}, "final_lr"),
        ({"steps": 5, "final_lr": 0.1, "schedule": "step"}, "schedule"),
        ({"steps": 5, "final_lr": 0.1, "mixture": {"web": float("nan")}}, "mixture"),
        ({"steps": 5, "final_lr": 0.1, "mixture": {"web": -0.5}}, "mixture"),
        ({"steps": 5, "final_lr": 0.1, "extra": 1}, "extra"),
    ],
)
def test_anneal_rejects_absurd_values_naming_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        AnnealRequest.model_validate(body)
    assert field in str(e.value)


def test_rollback_request_and_answer_aliases():
    assert RollbackRequest().checkpoint_id is None
    with pytest.raises(ValidationError):
        RollbackRequest(checkpoint_id=0)
    a = RollbackAccepted.model_validate({"run_id": "run-0123456789ab", "incident": 3, "rollback_to_step": 80, "action": "rollback"})
    assert (a.incident_id, a.target_step, a.model_dump()["action"]) == (3, 80, "rollback")


ALERTMANAGER_EXAMPLE = {
    "receiver": "trainguard",
    "status": "resolved",
    "alerts": [
        {
            "status": "resolved",
            "labels": {"alertname": "TrainguardHang", "run": "run-0123456789ab", "stage": "sft", "rank": "1"},
            "annotations": {"description": "rank 1 stopped stepping"},
            "startsAt": "2026-03-01T10:00:00.123456789Z",
            "endsAt": "2026-03-01T10:05:00Z",
            "generatorURL": "http://prom/graph?g0.expr=x",
            "fingerprint": "c0ffee",
        }
    ],
    "groupLabels": {"alertname": "TrainguardHang"},
    "commonLabels": {"alertname": "TrainguardHang"},
    "commonAnnotations": {},
    "externalURL": "http://am:9093",
    "version": "4",
    "groupKey": "{}:{alertname=\"TrainguardHang\"}",
    "truncatedAlerts": 0,
    "someFutureField": True,
}


def test_a_real_alertmanager_payload_parses_and_ignores_unknown_fields():
    p = AlertmanagerPayload.model_validate(ALERTMANAGER_EXAMPLE)
    assert p.status == "resolved" and p.alerts[0].labels["rank"] == "1"
    assert p.alerts[0].endsAt.year == 2026


def test_firing_alert_with_zero_ends_at_parses():
    alert = {**ALERTMANAGER_EXAMPLE["alerts"][0], "status": "firing", "endsAt": "0001-01-01T00:00:00Z"}
    p = AlertmanagerPayload.model_validate({**ALERTMANAGER_EXAMPLE, "status": "firing", "alerts": [alert]})
    assert p.alerts[0].endsAt.year == 1


@pytest.mark.parametrize("change", [{"version": "3"}, {"version": 4}, {"alerts": [{"status": "firing"}]}, {"groupKey": None}])
def test_payloads_that_are_not_version_4_are_rejected(change):
    with pytest.raises(ValidationError):
        AlertmanagerPayload.model_validate({**ALERTMANAGER_EXAMPLE, **change})
