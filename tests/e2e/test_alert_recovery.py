"""Issue 4 end to end: Prometheus discovers the workers through the supervisor's /sd and scrapes
them; a loss spike fires TrainguardLossSpike, Alertmanager posts it to the supervisor, and the
run is rolled back -- once, whether the supervisor's own watch saw the spike too or not.

The stack (real prometheus + prometheus-alertmanager, configs derived from deploy/) is one per
module; each test starts its own supervisor on the stack's supervisor port (tests/e2e/conftest.py).
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.supervisor.harness import incidents, metrics_log, tiny_pipeline, wait_state

pytestmark = pytest.mark.e2e

SPIKE_FAMILY = ("loss_spike", "divergence", "nan", "grad_explosion")


def _submit(client: httpx.Client, spec) -> str:
    r = client.post("/runs", json={"spec": spec.model_dump(mode="json")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _spike_incidents(ctl, run_id: str) -> list:
    return [i for i in incidents(ctl, run_id) if i.kind in SPIKE_FAMILY]


def _describe(incs) -> list:
    return [dict(id=i.id, kind=i.kind, source=i.source, onset=i.onset_step, action=i.action, outcome=i.outcome,
                 to=i.rollback_to_step, fps=i.alert_fingerprints) for i in incs]


def _assert_discovered(stack, ctl, run_id: str) -> dict:
    """The worker is a Prometheus target found through /sd, up, with run/stage/rank labels."""
    (target,) = stack.wait(lambda: stack.worker_targets(run_id), 60,
                           f"Prometheus to discover and scrape run {run_id}'s worker through /sd")
    labels = target["labels"]
    assert labels["stage"] == "pretrain" and labels["rank"] == "0" and labels["job"] == "trainguard-workers", labels
    addresses = {t.address for t in ctl.drivers[run_id].active.targets}
    assert labels["instance"] in addresses, (labels, addresses)
    # the supervisor scrapes as itself too
    sup = [t for t in stack.targets() if t["labels"].get("job") == "trainguard-supervisor"]
    assert sup and sup[0]["labels"]["instance"] == f"127.0.0.1:{stack.sup_port}", sup
    return target


def _run_spike_scenario(stack, ctl, client, state_dir: Path, name: str, *, spike_at: int, spike_len: int,
                        step_delay: float) -> tuple[str, object]:
    """`spike_len` corrupted batches from batch `spike_at`; `step_delay` paces the steps so that the
    spike is seen by 1 s scrapes: the tiny model fits the corrupted batches fast, so the loss stays
    above the rule's 1.5x-median line for only ~13 steps (measured: 10.7 at onset, back under 5 by
    the 14th corrupted batch). At ~0.18 s a step that is ~2 s, at least one scrape and evaluation."""
    spec = tiny_pipeline(name=name, steps=3000, every=10, keep_last=20,
                         faults=[{"kind": "loss_spike", "at_step": spike_at, "duration": spike_len}],
                         extra={"step_delay": step_delay})
    run_id = _submit(client, spec)
    _assert_discovered(stack, ctl, run_id)

    # Alertmanager delivers TrainguardLossSpike for this run to the supervisor, which answers 200.
    ctx = lambda: {**stack.run_context(client, run_id), "incidents": _describe(incidents(ctl, run_id))}  # noqa: E731
    fired = stack.wait(lambda: [a for a in stack.tap.alerts(alertname="TrainguardLossSpike", run=run_id)
                                if a["status"] == "firing"], 90,
                       f"Alertmanager to post a firing TrainguardLossSpike for {run_id} to the supervisor",
                       context=ctx)
    assert all(a["_http_status"] == 200 for a in fired), fired
    assert fired[0]["labels"]["severity"] == "recover" and fired[0]["labels"]["trainguard_kind"] == "loss_spike"

    # The rollback is carried out and the run is running again.
    def recovered():
        incs = _spike_incidents(ctl, run_id)
        return incs if incs and all(i.outcome == "resolved" for i in incs) else None

    stack.wait(recovered, 60, f"the spike incident of {run_id} to be resolved (rolled back and stepping again)",
               context=ctx)

    # Let the alert resolve: Prometheus stops firing, Alertmanager posts `resolved` (send_resolved),
    # and the supervisor has seen every notification there will be for this spike.
    stack.wait(lambda: [a for a in stack.tap.alerts(alertname="TrainguardLossSpike", run=run_id)
                        if a["status"] == "resolved"], 60,
               f"Alertmanager to post the resolved TrainguardLossSpike for {run_id}")
    ctl_step = lambda: ctl.drivers[run_id].active.last_step  # noqa: E731
    s0 = ctl_step()
    stack.wait(lambda: ctl_step() >= s0 + 10, 30, "the run to keep stepping after the alert resolved")

    incs = _spike_incidents(ctl, run_id)
    assert len(incs) == 1, f"one spike, one incident, handled once; got {_describe(incs)}\n{stack.diag()}"
    inc = incs[0]
    fingerprints = {a["fingerprint"] for a in fired}
    assert set(inc.alert_fingerprints or []) & fingerprints, (
        f"the incident does not carry the alert's fingerprint {fingerprints}: {_describe(incs)}")
    assert inc.action == "rollback" and inc.outcome == "resolved", _describe(incs)
    assert spike_at - 3 <= inc.onset_step <= spike_at + spike_len, _describe(incs)
    assert inc.rollback_to_step is not None and inc.rollback_to_step < spike_at, _describe(incs)
    rollbacks = [i for i in incidents(ctl, run_id) if i.action in ("rollback", "restart")]
    assert len(rollbacks) == 1, f"handled twice: {_describe(rollbacks)}"

    # The workers' trainguard_step went back: the worker's own per-step log shows the regression
    # to the checkpoint, and the corrupted batches are not trained on again.
    log = metrics_log(state_dir, run_id, "pretrain")
    backs = [(log[i - 1]["step"], log[i]["step"]) for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"]]
    assert len(backs) == 1, f"expected exactly one step regression in the worker's log, got {backs}"
    assert backs[0][1] == inc.rollback_to_step + 1, (backs, inc.rollback_to_step)
    skip = [tuple(r) for r in inc.skip]
    back_at = next(i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"])
    assert not [r["batch_index"] for r in log[back_at:] if any(a <= r["batch_index"] < b for a, b in skip)]

    # and Prometheus saw it go back too (the scrape after the rollback is below the one before).
    assert stack.query(f'resets(trainguard_step{{run="{run_id}"}}[5m]) > 0'), (
        "Prometheus did not see trainguard_step go back\n" + stack.diag())

    assert client.post(f"/runs/{run_id}/stop").status_code == 202
    assert wait_state(ctl, run_id, ("stopped",), timeout=30) == "stopped"
    return run_id, inc


def test_alert_and_watch_together_recover_a_loss_spike_once(stack, tmp_path):
    """Both paths on, wired as deploy/compose.yaml wires them: the watch reads the same Prometheus
    (TRAINGUARD_PROMETHEUS_URL), so it can only act on the spike after Prometheus has scraped it
    at least twice (the detector's persistence) -- by then the alert rule (for: 0s here) has
    fired on the first of those scrapes. Whichever path reaches the run's lock first handles the
    spike; the other must merge into that incident. The watch needs 16 samples of history
    (LossSpikeConfig.min_history) at one per scrape: the spike comes after ~23 s."""
    state = tmp_path / "state"
    with stack.supervisor(state, watch_enabled=True, prometheus_url=stack.prom_url) as (ctl, client):
        _, inc = _run_spike_scenario(stack, ctl, client, state, "e2e-watch-and-alert",
                                     spike_at=130, spike_len=20, step_delay=0.15)
    print("incident:", _describe([inc]))
    assert inc.source in ("watch", "alert")


def test_alert_alone_recovers_a_loss_spike_with_the_watch_off(stack, tmp_path):
    state = tmp_path / "state"
    with stack.supervisor(state, watch_enabled=False) as (ctl, client):
        assert ctl.settings.watch_enabled is False
        _, inc = _run_spike_scenario(stack, ctl, client, state, "e2e-alert-only",
                                     spike_at=60, spike_len=20, step_delay=0.15)
    assert inc.source == "alert", inc


def test_alertmanager_pages_needs_attention_and_inhibits_that_runs_recovery_alerts(stack, tmp_path):
    """The derived Alertmanager (deploy/alertmanager/alertmanager.yml routes and inhibition):
    a needs_attention page goes to the pager, not the supervisor, and silences the same run's
    recovery alerts; another run's recovery alert still reaches the supervisor."""
    from datetime import datetime, timedelta, timezone

    def alert(name: str, kind: str, severity: str, run: str, ends: datetime) -> dict:
        return {"labels": {"alertname": name, "severity": severity, "trainguard_kind": kind, "run": run,
                           "stage": "pretrain"},
                "annotations": {"summary": f"{name} for {run} (posted by the e2e test)"},
                "startsAt": datetime.now(timezone.utc).isoformat(), "endsAt": ends.isoformat()}

    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    held, other = "e2e-run-held-by-a-human", "e2e-run-unknown-to-the-supervisor"
    page = [alert("TrainguardNeedsAttention", "needs_attention", "page", held, later)]
    recover = [alert("TrainguardLossSpike", "loss_spike", "recover", held, later),
               alert("TrainguardLossSpike", "loss_spike", "recover", other, later)]
    batch = page + recover
    with stack.supervisor(tmp_path / "state") as (ctl, _client):
        # The page is in Alertmanager before the recovery alerts arrive, as when a run went to
        # needs_attention and its detectors keep firing. (Posted in one batch, a recovery alert
        # could be dispatched before Alertmanager's inhibitor had taken in the page: with this
        # stack's group_wait of 0s that raced, and the test failed once in a full run.)
        r = httpx.post(f"{stack.am_url}/api/v2/alerts", json=page, timeout=5)
        assert r.status_code == 200, r.text
        stack.wait(lambda: [a for a in stack.pager.alerts() if a["labels"].get("run") == held], 30,
                   "the needs_attention page to reach the pager (Alertmanager has taken it in)")
        r = httpx.post(f"{stack.am_url}/api/v2/alerts", json=recover, timeout=5)
        assert r.status_code == 200, r.text
        try:
            paged = stack.wait(lambda: [a for a in stack.pager.alerts() if a["labels"].get("run") == held], 30,
                               "the needs_attention page to reach the pager")
            assert {a["labels"]["alertname"] for a in paged} == {"TrainguardNeedsAttention"}, paged
            (spike,) = stack.am_alerts(alertname="TrainguardLossSpike", run=held)
            assert spike["status"]["state"] == "suppressed" and spike["status"]["inhibitedBy"], spike["status"]
            got = stack.wait(lambda: stack.tap.alerts(run=other), 30,
                             "the other run's recovery alert to reach the supervisor")
            assert all(a["_http_status"] == 200 for a in got), got  # unknown run: accepted, nothing to do
            assert not stack.tap.alerts(run=held), "an inhibited / paging alert reached the supervisor"
            assert not [a for a in stack.pager.alerts() if a["labels"].get("run") == other]
            assert incidents(ctl, other) == []
        finally:
            now = datetime.now(timezone.utc)
            httpx.post(f"{stack.am_url}/api/v2/alerts", timeout=5,
                       json=[{**a, "endsAt": now.isoformat()} for a in batch])
