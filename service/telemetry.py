"""The supervisor's own metrics (its /metrics): recovery and its cost."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trainguard.service.domain.state import RunState
from trainguard.workers.contract import MetricName

RUN_STATES = tuple(s.value for s in RunState)


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.incidents = Counter(MetricName.INCIDENTS, "Incidents recorded", ["run", "stage", "kind"], registry=r)
        self.rollbacks = Counter(MetricName.ROLLBACKS, "Rollbacks and restarts carried out", ["run", "stage"], registry=r)
        self.recovery_seconds = Histogram(
            MetricName.RECOVERY_SECONDS, "Seconds from detection to the first step after recovery", ["kind"],
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=r,
        )
        self.goodput = Gauge(MetricName.GOODPUT, "Productive step time / wall time", ["run"], registry=r)
        self.run_state = Gauge(MetricName.RUN_STATE, "1 for the run's current state", ["run", "state"], registry=r)

    def set_state(self, run: str, state: str) -> None:
        for s in RUN_STATES:
            self.run_state.labels(run=run, state=s).set(1.0 if s == state else 0.0)

    def text(self) -> bytes:
        return generate_latest(self.registry)
