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

Prometheus finds a new worker group 1-12 s after it starts (the http_sd refresh of 1 s, then the
discovery manager's and the scrape manager's 5 s update tickers, then up to one scrape
interval), and a 50-step stage here lives about 6 s: left alone, a stage can end scraped once or
never, and then rate() -- so its recording rules -- has nothing for it. `_GroupHolder` therefore
keeps every worker group alive until Prometheus has what this test reads from it.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from trainguard.service.adapters.promql_inventory import (
    iter_dashboard_queries,
    iter_dashboard_variables,
    iter_rule_exprs,
    metric_names,
    render_expr,
)
from tests.integration.supervisor.harness import TERMINAL, incidents, run_state, wait_state
from trainguard.workers.spec import parse_pipeline

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
    "TrainguardPolicyRatio": "a healthy PPO clips a few tokens per minibatch, far under the rule's median 0.5",
    "TrainguardNegativeKl": "PPO samples on-policy (temperature 1): the KL estimate's median stays >= 0",
    "TrainguardEntropyCollapse": "a 50-step healthy PPO loses a few percent of its entropy, not 60%",
    "TrainguardResponseLength": "nothing rewards length here: the mean length stays near its median",
    "TrainguardValueLossExplosion": "the value loss falls from its start, and the stage is shorter than the 5 min offset",
    "TrainguardDpoCollapse": "a 50-step healthy DPO does not halve its chosen log-probability",
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
            # a group that Prometheus has not scraped twice HOLD_MARGIN_STEPS before it ends is
            # held there (_GroupHolder): rate() and the recording rules need two scrapes of each
            {"name": "pretrain", "kind": "pretrain", "steps": 160, **common,
             "faults": [{"kind": "worker_crash", "at_step": 80}]},
            {"name": "sft", "kind": "sft", "steps": 50, **common},
            {"name": "reward_model", "kind": "reward_model", "steps": 50, **common},
            {"name": "ppo", "kind": "ppo", "steps": 50, "response_len": 8, **common},
            {"name": "dpo", "kind": "dpo", "steps": 50, **common},
        ],
    })


# A worker group that nears its end (this many steps before it) before Prometheus has scraped it
# twice is held. At step_delay 0.1 s that leaves >= 2 s for this test's poll (0.2 s), the pause
# request and the ranks' next step boundary. A group that ends anyway is not passed over: the
# check after the run names it.
HOLD_MARGIN_STEPS = 20


@dataclass
class _Group:
    address: str
    stage: str
    end_step: int  # where the group ends: its stage's steps, or the injected crash that ends it
    held_s: float | None = None  # how long it was held, if it was
    satisfied: bool = False


class _GroupHolder:
    """Drives the run to its end, holding each worker group until Prometheus has scraped it.

    Every worker group of the run is followed through /sd. One that comes within
    HOLD_MARGIN_STEPS of its end (read from its own /metrics) before Prometheus has scraped it
    twice and recorded trainguard:tokens:rate1m for its stage is paused -- an operator pause: the
    ranks wait at a step boundary and keep serving /metrics -- until that holds, then resumed.
    A group scraped in time is never paused. Meanwhile it notes the first pretrain worker target
    that Prometheus lists (the discovery check)."""

    def __init__(self, stack, ctl, client, http: httpx.Client, run_id: str, spec, t0: float) -> None:
        # http: one client for what is polled (httpx.get would build a client, SSL context included, per call)
        self.stack, self.ctl, self.client, self.http = stack, ctl, client, http
        self.run_id, self.t0 = run_id, t0
        self.steps = {st.name: st.steps for st in spec.stages}
        self.crashes = {st.name: sorted(f.at_step for f in st.faults if f.kind.value == "worker_crash")
                        for st in spec.stages}
        self.groups: dict[str, _Group] = {}
        self.started: Counter[str] = Counter()
        self.first: dict | None = None

    # -- what Prometheus has
    def _prometheus(self, api: str, **params) -> list | dict:
        body = self.http.get(f"{self.stack.prom_url}/api/v1/{api}", params=params).json()
        assert body.get("status") == "success", f"{api} {params}: {body}"
        return body["data"]

    def _tokens_samples(self, g: _Group) -> int:
        got = self._prometheus("query", query=(
            f'count_over_time(trainguard_tokens_total{{run="{self.run_id}", instance="{g.address}"}}[1h])'))
        return int(max((float(s["value"][1]) for s in got["result"]), default=0))

    def satisfied(self, g: _Group) -> bool:
        """Prometheus scraped the group at least twice and the rules recorded its stage's rate."""
        if not g.satisfied:
            g.satisfied = self._tokens_samples(g) >= 2 and bool(self._prometheus(
                "query_range", query=f'trainguard:tokens:rate1m{{run="{self.run_id}", stage="{g.stage}"}}',
                start=self.t0, end=time.time() + 1, step=1.0)["result"])
        return g.satisfied

    def report(self) -> list:
        return [(g.stage, g.address, f"ends at step {g.end_step}",
                 "not held" if g.held_s is None else f"held {g.held_s:.1f}s",
                 f"{self._tokens_samples(g)} scrapes", "ok" if self.satisfied(g) else "MISSING")
                for g in self.groups.values()]

    # -- the run
    def _live(self) -> dict[str, str]:
        """address -> stage of the run's worker groups in /sd now (what the supervisor's /api/v1/sd
        answers, read in-process: this is polled); new ones are registered."""
        live = {}
        for grp in self.ctl.sd_targets():
            labels = grp.get("labels") or {}
            if labels.get("job") == "trainguard-workers" and labels.get("run") == self.run_id:
                for address in grp["targets"]:
                    live[address] = labels["stage"]
                    if address not in self.groups:
                        k = self.started[labels["stage"]]
                        self.started[labels["stage"]] += 1
                        ends = self.crashes[labels["stage"]]
                        end = ends[k] if k < len(ends) else self.steps[labels["stage"]]
                        self.groups[address] = _Group(address, labels["stage"], end)
        return live

    def _step(self, address: str) -> float | None:
        try:
            text = self.http.get(f"http://{address}/metrics").text
        except httpx.HTTPError:
            return None  # gone (its stage ended or it crashed)
        for line in text.splitlines():
            if line.startswith("trainguard_step{") or line.startswith("trainguard_step "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def _poll(self):
        state = run_state(self.ctl, self.run_id)
        if state in TERMINAL:
            return ("end", state)
        live = self._live()
        if self.first is None:
            self.first = next((t for t in self._prometheus("targets", state="active")["activeTargets"]
                               if t["labels"].get("run") == self.run_id and t["labels"].get("stage") == "pretrain"
                               and t["labels"].get("job") == "trainguard-workers"), None)
        if state != "running":
            return None
        for address in live:
            g = self.groups[address]
            if g.held_s is not None or self.satisfied(g):
                continue
            step = self._step(address)
            if step is not None and step >= g.end_step - HOLD_MARGIN_STEPS:
                return ("hold", g)
        return None

    def _hold(self, g: _Group) -> None:
        r = self.client.post(f"/runs/{self.run_id}/pause")
        if r.status_code == 409:
            return  # the run just left "running" (a crash, or its end): poll again
        assert r.status_code == 202, r.text
        held = time.monotonic()
        g.held_s = 0.0
        try:
            self.stack.wait(lambda: self.satisfied(g) or g.address not in self._live(), 60,
                            f"Prometheus to scrape the held {g.stage} group at {g.address} twice",
                            context=self.report)
        finally:
            # between two stages there is no group to tell (409): the next one starts paused
            self.stack.wait(lambda: self.client.post(f"/runs/{self.run_id}/resume").status_code == 202, 30,
                            "the held run to resume", context=self.report)
            g.held_s = time.monotonic() - held

    def run_to_end(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            what, arg = self.stack.wait(self._poll, deadline - time.monotonic(),
                                        f"run {self.run_id} to end", context=self.report)
            if what == "end":
                return arg
            self._hold(arg)


def _has_data(result: list[dict]) -> tuple[bool, bool]:
    """(any sample, any non-NaN sample) of a range query result."""
    values = [float(v) for series in result for _, v in series.get("values", [])]
    return bool(values), any(not math.isnan(v) for v in values)


def test_discovery_follows_restarts_and_every_panel_and_rule_has_data(stack, tmp_path):
    state = tmp_path / "state"
    with stack.supervisor(state, watch_enabled=True) as (ctl, client), httpx.Client(timeout=10) as http:
        stack.wait(lambda: stack.query('up{job="trainguard-supervisor"} == 1'), 30,
                   "Prometheus to scrape the new supervisor")
        t0 = time.time()
        spec = _pipeline()
        r = client.post("/runs", json={"spec": spec.model_dump(mode="json")})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        ctx = lambda: stack.run_context(client, run_id)  # noqa: E731

        # -- every stage runs, each worker group held until Prometheus has scraped it; the run completes
        holder = _GroupHolder(stack, ctl, client, http, run_id, spec, t0)
        try:
            holder.run_to_end(240)
            assert wait_state(ctl, run_id, timeout=10) == "completed"
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- context: {ctx()}\n{stack.diag()}") from None

        # -- discovery: the pretrain worker was found through /sd (discovered is enough here: health
        # may still have been "unknown" on a loaded machine; that it was scraped is checked below)
        first = holder.first
        assert first is not None, f"Prometheus never listed a pretrain worker target\n{holder.report()}"
        assert first["labels"]["rank"] == "0" and first["labels"]["job"] == "trainguard-workers", first["labels"]
        incs = incidents(ctl, run_id)
        assert [(i.kind, i.action, i.outcome) for i in incs] == [("worker_lost", "restart", "resolved")], \
            [(i.kind, i.action, i.outcome, i.onset_step) for i in incs]
        # the supervisor's final gauges (state, goodput) are scraped after completion
        stack.wait(lambda: stack.query(f'trainguard_run_state{{run="{run_id}", state="completed"}} == 1'), 30,
                   "Prometheus to scrape the completed run state")
        # the workers of the finished run leave /sd, and so Prometheus's targets
        stack.wait(lambda: not [t for t in stack.targets() if t["labels"].get("run") == run_id], 30,
                   "the finished run's workers to leave Prometheus's targets", context=ctx)
        # every group was scraped twice and the recording rules evaluated every stage, the last one included
        stack.wait(lambda: all(holder.satisfied(g) for g in holder.groups.values()), 20,
                   "Prometheus to have scraped every worker group twice and recorded every stage's rate",
                   context=holder.report)
        assert {g.stage for g in holder.groups.values()} == set(STAGES), holder.report()
        groups = holder.report()
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
    print("\n".join(["worker groups:", *map(str, groups), "allowed-empty alert expressions:", *report]))
    assert not failures, f"{len(failures)} of {len(exprs)} expressions failed:\n" + "\n".join(failures)
