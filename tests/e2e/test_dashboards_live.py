"""Every PromQL expression of every dashboard panel and every rule, run against the live
Prometheus of the e2e stack while a real pipeline runs through it; plus discovery of a worker
group that was restarted on new ports.

The pipeline covers every stage kind a dashboard panel reads (anneal exports nothing that
pretrain does not): pretrain (a worker_crash: the group restarts on new ports, which also
yields an incident, a restart counted as a rollback, and a recovery time) -> sft ->
reward_model (preference accuracy) -> ppo (reward, KL, KL target and coefficient) -> dpo
(margin, chosen log-probability).

Panels are checked the way Grafana runs them: a range query over the run's lifetime, with the
dashboard variables set to the run, every stage (".*", the "All" value) and $__rate_interval
10s (four 1 s scrapes and a margin). An expression has data when the range query returns at
least one series with at least one sample.
"""
from __future__ import annotations

import math
import time

import httpx
import pytest

from service.adapters.promql_inventory import (
    iter_dashboard_queries,
    iter_dashboard_variables,
    iter_rule_exprs,
    metric_names,
    render_expr,
)
from tests.integration.supervisor.harness import incidents, wait_state
from workers.spec import parse_pipeline

pytestmark = pytest.mark.e2e

STAGES = ("pretrain", "sft", "reward_model", "ppo", "dpo")

# Alert expressions that may legitimately return nothing on this pipeline, and why.
# Each still has to name only series that exist (checked below).
MAY_BE_EMPTY = {
    "TrainguardLossSpike": "no loss spike is injected here (it fires in test_alert_recovery.py)",
    "TrainguardGradExplosion": "no gradient spike is injected here",
    "TrainguardValDivergence": "no validation divergence is injected (a noisy 1-batch eval may still trip it)",
    "TrainguardKlBudgetBreach": "whether a 30-step tiny PPO exceeds 2x its KL target is not controlled here",
    "TrainguardLowGoodput": "goodput may or may not be under 0.8 in a short run with a crash restart",
}
# Alert expressions that must return nothing on this pipeline: a result is a false positive.
MUST_BE_EMPTY = {
    "TrainguardNonFinite": "no NaN/inf is injected",
    "TrainguardHang": "every rank steps at least every few seconds (the rule waits 180 s)",
    "TrainguardStraggler": "every stage has one rank: its ratio to the fastest rank is 1",
    "TrainguardGpuXidErrors": "the fake NVML counts Xid errors only when gpu_xid is injected",
    "TrainguardGpuEccErrors": "the fake NVML counts ECC errors only when injected",
    "TrainguardNeedsAttention": "the one crash is recovered",
    "TrainguardSupervisorDown": "the supervisor is up for the whole window",
    "TrainguardRepeatedIncidents": "one incident, under the rule's 3",
}
# Panel or rule expressions whose only values may be NaN here (a panel shows them as gaps).
NAN_OK = {
    "histogram_quantile(0.5, sum by (kind, le) (rate(trainguard_recovery_seconds_bucket[10s])))":
        "one recovery: its histogram series is created by that observation, so rate() over it is 0",
    "histogram_quantile(0.95, sum by (kind, le) (rate(trainguard_recovery_seconds_bucket[10s])))":
        "one recovery: its histogram series is created by that observation, so rate() over it is 0",
}


def _pipeline():
    common = {"batch_size": 8, "eval_every": 10, "eval_batches": 1, "step_delay": 0.1,
              "checkpoint": {"every": 10, "keep_last": 3}}
    return parse_pipeline({
        "name": "e2e-dashboards", "seed": 11,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        "checkpoint": {"every": 10, "keep_last": 3},
        "stages": [
            # each worker group lives > 5 s (with warm workers a stage starts in ~1 s): Prometheus's
            # discovery manager hands new targets to the scrapers at most every 5 s, and rate()
            # and the recording rules need two scrapes in every stage
            {"name": "pretrain", "kind": "pretrain", "steps": 160, **common,
             "faults": [{"kind": "worker_crash", "at_step": 80}]},
            {"name": "sft", "kind": "sft", "steps": 50, **common},
            {"name": "reward_model", "kind": "reward_model", "steps": 50, **common},
            {"name": "ppo", "kind": "ppo", "steps": 50, "response_len": 8, **common},
            {"name": "dpo", "kind": "dpo", "steps": 50, **common},
        ],
    })


def _has_data(result: list[dict]) -> tuple[bool, bool]:
    """(any sample, any non-NaN sample) of a range query result."""
    values = [float(v) for series in result for _, v in series.get("values", [])]
    return bool(values), any(not math.isnan(v) for v in values)


def test_discovery_follows_restarts_and_every_panel_and_rule_has_data(stack, tmp_path):
    state = tmp_path / "state"
    with stack.supervisor(state, watch_enabled=True) as (ctl, client):
        stack.wait(lambda: stack.query('up{job="trainguard-supervisor"} == 1'), 30,
                   "Prometheus to scrape the new supervisor")
        t0 = time.time()
        r = client.post("/runs", json={"spec": _pipeline().model_dump(mode="json")})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]

        # -- discovery: the pretrain worker is found through /sd and scraped
        ctx = lambda: stack.run_context(client, run_id)  # noqa: E731
        # discovered is enough here (health may still be "unknown" on a loaded machine); that it was
        # scraped is what the panel queries below check
        (first,) = stack.wait(lambda: [t for t in stack.worker_targets(run_id, up=False)
                                       if t["labels"]["stage"] == "pretrain"],
                              90, "Prometheus to scrape the pretrain worker through /sd", context=ctx)
        assert first["labels"]["rank"] == "0" and first["labels"]["job"] == "trainguard-workers", first["labels"]

        # -- every stage runs; the run completes
        try:
            assert wait_state(ctl, run_id, timeout=240) == "completed"
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- context: {ctx()}\n{stack.diag()}") from None
        incs = incidents(ctl, run_id)
        assert [(i.kind, i.action, i.outcome) for i in incs] == [("worker_lost", "restart", "resolved")], \
            [(i.kind, i.action, i.outcome, i.onset_step) for i in incs]
        # the supervisor's final gauges (state, goodput) are scraped after completion
        stack.wait(lambda: stack.query(f'trainguard_run_state{{run="{run_id}", state="completed"}} == 1'), 30,
                   "Prometheus to scrape the completed run state")
        # the workers of the finished run leave /sd, and so Prometheus's targets
        stack.wait(lambda: not [t for t in stack.targets() if t["labels"].get("run") == run_id], 30,
                   "the finished run's workers to leave Prometheus's targets", context=ctx)
        t1 = time.time() + 1
        stack.wait(lambda: stack.query_range(f'trainguard:tokens:rate1m{{run="{run_id}", stage="dpo"}}', t0, t1),
                   20, "the recording rules to have evaluated the last stage")
        t1 = time.time()

    # -- the crashed pretrain rank came back on a new port, and Prometheus discovered and scraped it
    # there: the same run/stage/rank series from two instances, the crashed one gone from the targets.
    instances = stack.query_range(
        f'count by (instance, run, stage, rank) (trainguard_step{{run="{run_id}", stage="pretrain"}})', t0, t1)
    seen = sorted({s["metric"]["instance"] for s in instances})
    assert len(seen) == 2 and all(s["metric"]["rank"] == "0" for s in instances), (
        f"expected pretrain rank 0 scraped on two ports (before and after its crash), got {seen}; all step "
        f"series: {[s['metric'] for s in stack.query_range('trainguard_step', t0, t1)]}\n{stack.diag()}")
    assert first["labels"]["instance"] in seen

    # -- template variables: run and stage offer this run and its stages
    for dash, var, selector, label in iter_dashboard_variables():
        params = {"start": t0, "end": t1}
        if selector:
            params["match[]"] = render_expr(selector, run=run_id, stage=".*")
        values = httpx.get(f"{stack.prom_url}/api/v1/label/{label}/values", params=params, timeout=10).json()["data"]
        want = {run_id} if var == "run" else set(STAGES)
        assert want <= set(values), f"{dash}: variable {var} offers {values}, missing {want - set(values)}"

    # -- every panel and rule expression
    exprs = [(f"{d} / {title}", render_expr(e, run=run_id, stage=".*", rate_interval="10s"), None)
             for d, title, e in iter_dashboard_queries()]
    exprs += [(f"{f} / {name}", e, name) for f, name, e in iter_rule_exprs()]
    known = set(MAY_BE_EMPTY) | set(MUST_BE_EMPTY)
    alert_names = {name for f, name, _ in iter_rule_exprs() if f == "alerts.yml"}
    assert alert_names <= known, f"alert rules without an expectation here: {alert_names - known}"
    assert known <= alert_names, f"expectations for alerts that no longer exist: {known - alert_names}"

    failures, report = [], []
    metrics_seen: dict[str, bool] = {}
    for where, expr, name in exprs:
        result = stack.query_range(expr, t0, t1, 1.0)
        any_sample, any_number = _has_data(result)
        if name in MUST_BE_EMPTY:
            if any_sample:
                failures.append(f"{where}: fired on a healthy run ({MUST_BE_EMPTY[name]}): "
                                f"{[s['metric'] for s in result][:3]}\n  {expr}")
        elif name in MAY_BE_EMPTY:
            report.append(f"{where}: {'data' if any_sample else 'empty'}")
        elif not any_sample:
            failures.append(f"{where}: no data for run {run_id}\n  {expr}")
        elif not any_number and expr not in NAN_OK:
            failures.append(f"{where}: only NaN for run {run_id}\n  {expr}")
        # whatever the expression returns, every metric it names must exist (for this run where it
        # carries the run label): a metric nobody exports fails here even inside an allowed-empty alert
        for metric in sorted(metric_names(expr)):
            if metric not in metrics_seen:
                sel = f'{{__name__="{metric}", run="{run_id}"}}'
                got = stack.query_range(f"count({sel})", t0, t1, 1.0) or \
                    stack.query_range(f'count({{__name__="{metric}"}})', t0, t1, 1.0)
                metrics_seen[metric] = bool(got)
            if not metrics_seen[metric]:
                failures.append(f"{where}: names {metric}, which nothing exports or records\n  {expr}")
    print("\n".join(["allowed-empty alert expressions:", *report]))
    assert not failures, f"{len(failures)} of {len(exprs)} expressions failed:\n" + "\n".join(failures)
