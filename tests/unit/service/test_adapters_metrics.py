"""Metric sources read the names the workers export (workers.contract.MetricName), over a fake HTTP transport."""
from __future__ import annotations

import json
import math
import re

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from trainguard.service.adapters.metrics import DirectScrapeSource, PrometheusSource, Target
from trainguard.workers.contract import WORKER_LABELS, MetricName

TARGET = Target(run="run-000000000001", stage="pretrain", rank=0, host="127.0.0.1", port=9100)
OTHER = Target(run="run-000000000001", stage="pretrain", rank=1, host="127.0.0.1", port=9101)
LABELS = (TARGET.run, TARGET.stage, str(TARGET.rank))


def _worker_metrics_text() -> str:
    """What a worker's /metrics shows, built the way its exporter builds it (from the contract's names)."""
    r = CollectorRegistry()
    labels = list(WORKER_LABELS)
    Gauge(MetricName.STEP, "", labels, registry=r).labels(*LABELS).set(42)
    Gauge(MetricName.LAST_STEP_TS, "", labels, registry=r).labels(*LABELS).set(1_700_000_000.5)
    Gauge(MetricName.WORKER_PAUSED, "", labels, registry=r).labels(*LABELS).set(1)
    Gauge(MetricName.TRAIN_LOSS, "", labels, registry=r).labels(*LABELS).set(2.5)
    anomalies = Counter(MetricName.ANOMALIES, "", labels + ["kind"], registry=r)
    anomalies.labels(*LABELS, "nonfinite_loss").inc(2)
    anomalies.labels(*LABELS, "loss_spike").inc(0)
    Counter(MetricName.GPU_XID, "", labels + ["provider"], registry=r).labels(*LABELS, "fake").inc(1)
    ecc = Counter(MetricName.GPU_ECC, "", labels + ["provider"], registry=r)
    ecc.labels(*LABELS, "a").inc(2)
    ecc.labels(*LABELS, "b").inc(1)
    Histogram(MetricName.STEP_SECONDS, "", labels, registry=r).labels(*LABELS).observe(0.25)
    return generate_latest(r).decode()


def test_direct_scrape_reads_history_and_the_workers_counters():
    seen_since = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/history":
            seen_since.append(int(request.url.params["since"]))
            return httpx.Response(200, json=[{"seq": 7, "step": 41, "loss": 2.4}, {"seq": 8, "step": 42, "loss": 2.5}])
        return httpx.Response(200, text=_worker_metrics_text())

    src = DirectScrapeSource()
    src._client = httpx.Client(transport=httpx.MockTransport(handler))
    snap = src.fetch([TARGET])[TARGET]
    assert snap.reachable and [r["step"] for r in snap.records] == [41, 42]
    assert snap.counters == {"anomalies:nonfinite_loss": 2.0, "anomalies:loss_spike": 0.0, "gpu_xid": 1.0, "gpu_ecc": 3.0}
    assert (snap.step, snap.last_step_time, snap.paused) == (42, 1_700_000_000.5, True)
    src.fetch([TARGET])
    assert seen_since == [-1, 8]  # the cursor moved to the newest record's seq


def test_direct_scrape_of_an_unreachable_worker():
    src = DirectScrapeSource()
    src._client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(503)))
    assert not src.fetch([TARGET])[TARGET].reachable


def _vector(rows: list[tuple[str, Target, float, dict | None]], ts: float) -> dict:
    result = []
    for name, t, value, extra in rows:
        metric = {"__name__": name, "run": t.run, "stage": t.stage, "rank": str(t.rank), **(extra or {})}
        result.append({"metric": metric, "value": [ts, "NaN" if math.isnan(value) else str(value)]})
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_prometheus_source_turns_one_query_into_step_records():
    responses = [
        _vector([(MetricName.STEP, TARGET, 10, None), (MetricName.TRAIN_LOSS, TARGET, 2.0, None), (MetricName.KL, TARGET, 0.1, None),
                 (MetricName.STEP_SECONDS + "_sum", TARGET, 1.0, None), (MetricName.STEP_SECONDS + "_count", TARGET, 10, None),
                 (MetricName.ANOMALIES + "_total", TARGET, 0, {"kind": "nonfinite_loss"}),
                 (MetricName.STEP, OTHER, 3, None), (MetricName.TRAIN_LOSS, OTHER, 9.0, None)], ts=100.0),
        _vector([(MetricName.STEP, TARGET, 15, None), (MetricName.TRAIN_LOSS, TARGET, math.nan, None),
                 (MetricName.STEP_SECONDS + "_sum", TARGET, 2.0, None), (MetricName.STEP_SECONDS + "_count", TARGET, 15, None),
                 (MetricName.ANOMALIES + "_total", TARGET, 1, {"kind": "nonfinite_loss"}),
                 (MetricName.LAST_STEP_TS, TARGET, 101.0, None)], ts=101.0),
    ]
    queries = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(request.url.params["query"])
        return httpx.Response(200, content=json.dumps(responses[len(queries) - 1]))

    src = PrometheusSource("http://prometheus:9090/")
    src._client = httpx.Client(transport=httpx.MockTransport(handler))
    first = src.fetch([TARGET, OTHER])
    assert first[TARGET].records == [{"step": 10, "time": 100.0, "loss": 2.0, "kl": 0.1, "step_seconds": 0.1}]
    assert first[OTHER].records == [{"step": 3, "time": 100.0, "loss": 9.0}]

    second = src.fetch([TARGET])[TARGET]
    (rec,) = second.records
    assert rec["step"] == 15 and math.isnan(rec["loss"]) and abs(rec["step_seconds"] - 0.2) < 1e-12
    assert (rec["anomaly"], rec["anomaly_since"]) == ("nonfinite_loss", 11)
    assert second.last_step_time == 101.0 and second.counters == {"anomalies:nonfinite_loss": 1.0}

    # one selector (Prometheus anchors the regex) for every series a record or a counter is built from
    selector = re.fullmatch(r'\{__name__=~"([^"]+)",run!=""\}', queries[0]).group(1)
    wanted = [MetricName.STEP, MetricName.TRAIN_LOSS, MetricName.VAL_LOSS, MetricName.GRAD_NORM, MetricName.LEARNING_RATE, MetricName.SPIKE_SCORE, MetricName.REWARD_MEAN, MetricName.KL,
              MetricName.KL_TARGET, MetricName.KL_COEF, MetricName.PREFERENCE_ACCURACY, MetricName.DPO_REWARD_MARGIN, MetricName.DPO_CHOSEN_LOGPROB,
              MetricName.LAST_STEP_TS, MetricName.WORKER_PAUSED, MetricName.ANOMALIES + "_total", MetricName.GPU_XID + "_total", MetricName.GPU_ECC + "_total",
              MetricName.STEP_SECONDS + "_sum", MetricName.STEP_SECONDS + "_count"]
    assert [n for n in wanted if not re.fullmatch(selector, n)] == []
    assert not any(re.fullmatch(selector, n) for n in (MetricName.STEP_SECONDS + "_bucket", MetricName.TOKENS + "_total", MetricName.INCIDENTS + "_total"))


def test_prometheus_source_step_unchanged_gives_no_record():
    body = _vector([(MetricName.STEP, TARGET, 10, None), (MetricName.TRAIN_LOSS, TARGET, 2.0, None)], ts=5.0)
    src = PrometheusSource("http://prometheus:9090")
    src._client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=body)))
    assert len(src.fetch([TARGET])[TARGET].records) == 1
    assert src.fetch([TARGET])[TARGET].records == []
