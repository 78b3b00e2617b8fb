"""Metric sources: where the supervisor's watch gets step-aligned training signals.

Two implementations behind one Protocol, so the detectors see the same series:
- `DirectScrapeSource` (embedded default): reads each worker's `/history?since=SEQ`
  (every step, never missed) and `/metrics` (counters, heartbeat) itself.
- `PrometheusSource`: PromQL over the Prometheus HTTP API; one sample per scrape,
  so series are sparse (gaps between steps) — the detectors accept that.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from trainguard.workers.contract import STAGE_METRIC_NAMES, MetricName

log = logging.getLogger(__name__)

__all__ = ["Target", "Snapshot", "MetricsSource", "DirectScrapeSource", "PrometheusSource"]

# Names as exposed: prometheus-client adds _total to a counter's name, _sum/_count to a histogram's.
_ANOMALIES_TOTAL = MetricName.ANOMALIES + "_total"
_GPU_XID_TOTAL = MetricName.GPU_XID + "_total"
_GPU_ECC_TOTAL = MetricName.GPU_ECC + "_total"
_STEP_SECONDS_SUM = MetricName.STEP_SECONDS + "_sum"
_STEP_SECONDS_COUNT = MetricName.STEP_SECONDS + "_count"
_PROCESS_BUSY_TOTAL = MetricName.PROCESS_BUSY + "_total"


@dataclass(frozen=True)
class Target:
    run: str
    stage: str
    rank: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Snapshot:
    """What one fetch learned about one worker."""

    reachable: bool
    records: list[dict] = field(default_factory=list)  # new per-step records, oldest first
    counters: dict[str, float] = field(default_factory=dict)  # "anomalies:<kind>", "gpu_xid", "gpu_ecc"
    last_step_time: float | None = None  # heartbeat (unix seconds)
    step: int | None = None
    paused: bool = False
    # the worker process's busy counter (ran or waited to run, workers/runtime/busy.py) and when
    # it was read (unix seconds); None where it was not read live (Prometheus) or is not exported
    busy_seconds: float | None = None
    read_at: float | None = None


class MetricsSource(Protocol):
    def fetch(self, targets: list[Target]) -> dict[Target, Snapshot]: ...

    def forget(self, target: Target) -> None: ...

    def close(self) -> None: ...


def _counters_from_samples(samples: list[tuple[str, dict[str, str], float]], snap: Snapshot) -> None:
    for name, labels, value in samples:
        if name == _ANOMALIES_TOTAL:
            snap.counters[f"anomalies:{labels.get('kind', '')}"] = value
        elif name == _GPU_XID_TOTAL:
            snap.counters["gpu_xid"] = snap.counters.get("gpu_xid", 0.0) + value
        elif name == _GPU_ECC_TOTAL:
            snap.counters["gpu_ecc"] = snap.counters.get("gpu_ecc", 0.0) + value
        elif name == MetricName.LAST_STEP_TS:
            snap.last_step_time = value if value > 0 else None
        elif name == MetricName.STEP:
            snap.step = int(value)
        elif name == MetricName.WORKER_PAUSED:
            snap.paused = value >= 1
        elif name == _PROCESS_BUSY_TOTAL:
            snap.busy_seconds = value


class DirectScrapeSource:
    """Scrapes the workers' own endpoints. Keeps a per-target history cursor (`seq`)."""

    def __init__(self, timeout: float = 2.0) -> None:
        self._client = httpx.Client(timeout=timeout)
        self._seq: dict[Target, int] = {}

    def fetch(self, targets: list[Target]) -> dict[Target, Snapshot]:
        return {t: self._fetch_one(t) for t in targets}

    def _fetch_one(self, t: Target) -> Snapshot:
        base = f"http://{t.address}"
        try:
            hist = self._client.get(f"{base}/history", params={"since": self._seq.get(t, -1)})
            hist.raise_for_status()
            text = self._client.get(f"{base}/metrics").text
        except (httpx.HTTPError, ValueError) as e:
            log.debug("scrape of %s failed: %s", t, e)
            return Snapshot(reachable=False)
        snap = Snapshot(reachable=True, read_at=time.time())
        records = hist.json()
        if records:
            self._seq[t] = max(int(r["seq"]) for r in records)
        snap.records = records
        samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]
        _counters_from_samples(samples, snap)
        return snap

    def start_after(self, target: Target, seq: int) -> None:
        """Read `target`'s history from the record after `seq` on (a re-attached group)."""
        self._seq[target] = seq

    def forget(self, target: Target) -> None:
        self._seq.pop(target, None)

    def close(self) -> None:
        self._client.close()


# gauge -> the key of the worker's per-step history record that carries the same value
_PROM_TO_RECORD = {
    MetricName.TRAIN_LOSS: "loss", MetricName.GRAD_NORM: "grad_norm", MetricName.LEARNING_RATE: "lr",
    MetricName.SPIKE_SCORE: "spike_score",
    # every stage gauge (val loss, RLHF signals): the contract's table, inverted
    **{name: key for key, name in STAGE_METRIC_NAMES.items()},
}
_PROM_NAMES = (
    MetricName.STEP, *_PROM_TO_RECORD, MetricName.LAST_STEP_TS, MetricName.WORKER_PAUSED, _ANOMALIES_TOTAL, _GPU_XID_TOTAL, _GPU_ECC_TOTAL,
    _STEP_SECONDS_SUM, _STEP_SECONDS_COUNT,
)
_PROM_SELECTOR = '{__name__=~"' + "|".join(_PROM_NAMES) + '",run!=""}'


class PrometheusSource:
    """PromQL over the Prometheus HTTP API: one instant query per cycle for all workers.

    Each cycle yields at most one record per worker (the latest scrape), tagged with
    the worker's `trainguard_step`; a record is emitted only when the step advanced.
    """

    def __init__(self, url: str, timeout: float = 3.0) -> None:
        self._url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout)
        self._last_step: dict[Target, int] = {}
        self._last_sums: dict[Target, tuple[float, float]] = {}
        self._last_anomalies: dict[Target, dict[str, float]] = {}

    def _query(self) -> list[dict]:
        r = self._client.get(f"{self._url}/api/v1/query", params={"query": _PROM_SELECTOR})
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query failed: {body.get('error')}")
        return body["data"]["result"]

    def fetch(self, targets: list[Target]) -> dict[Target, Snapshot]:
        try:
            result = self._query()
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            log.warning("Prometheus query failed: %s", e)
            return {t: Snapshot(reachable=False) for t in targets}
        by_key: dict[tuple[str, str, str], list[tuple[str, dict[str, str], float, float]]] = {}
        for series in result:
            labels = series["metric"]
            key = (labels.get("run", ""), labels.get("stage", ""), labels.get("rank", ""))
            ts, val = series["value"]
            by_key.setdefault(key, []).append((labels["__name__"], labels, float(val), float(ts)))
        out: dict[Target, Snapshot] = {}
        for t in targets:
            rows = by_key.get((t.run, t.stage, str(t.rank)))
            if not rows:
                out[t] = Snapshot(reachable=False)
                continue
            snap = Snapshot(reachable=True)
            _counters_from_samples([(n, lab, v) for n, lab, v, _ in rows], snap)
            if snap.step is not None and snap.step != self._last_step.get(t):
                rec: dict = {"step": snap.step, "time": max(ts for *_, ts in rows)}
                sums = {n: v for n, _, v, _ in rows if n in (_STEP_SECONDS_SUM, _STEP_SECONDS_COUNT)}
                for n, _, v, _ in rows:
                    if n in _PROM_TO_RECORD:  # NaN passes through: the NaN detector needs it
                        rec[_PROM_TO_RECORD[n]] = v
                if _STEP_SECONDS_SUM in sums and _STEP_SECONDS_COUNT in sums:
                    s, c = sums[_STEP_SECONDS_SUM], sums[_STEP_SECONDS_COUNT]
                    ps, pc = self._last_sums.get(t, (0.0, 0.0))
                    if c > pc:
                        rec["step_seconds"] = (s - ps) / (c - pc)
                    self._last_sums[t] = (s, c)
                self._mark_anomaly(t, snap, rec)
                snap.records = [rec]
                self._last_step[t] = snap.step
            out[t] = snap
        return out

    def _mark_anomaly(self, t: Target, snap: Snapshot, rec: dict) -> None:
        """A scrape sees one step in several: the guard's counters (which count every step)
        say whether an anomaly happened in between; tag the record with it and with the first
        step it may have happened at."""
        now = {k: v for k, v in snap.counters.items() if k.startswith("anomalies:")}
        before = self._last_anomalies.get(t, {})
        self._last_anomalies[t] = now
        if snap.step is not None and snap.step <= self._last_step.get(t, -1):
            return  # the step went back (rollback): what the counters gained happened before it
        rose = [k.split(":", 1)[1] for k, v in now.items() if v > before.get(k, 0.0)]
        if rose:
            rec["anomaly"] = sorted(rose, key=lambda k: (not k.startswith("nonfinite"), k))[0]
            rec["anomaly_since"] = self._last_step.get(t, snap.step - 1) + 1

    def forget(self, target: Target) -> None:
        self._last_step.pop(target, None)
        self._last_sums.pop(target, None)
        self._last_anomalies.pop(target, None)

    def close(self) -> None:
        self._client.close()
