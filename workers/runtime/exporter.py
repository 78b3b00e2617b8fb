"""Per-worker metrics: a private CollectorRegistry, an HTTP server on port 0.

Serves `/metrics` (Prometheus text format) and `/history?since=N` (JSON list of the
per-step records in the ring buffer with `seq > N`). Every record carries `seq`, which
only increases within a worker process and equals `step` until a rollback sends the
step back (replayed steps then get fresh seqs, so a reader's cursor never misses them).
Every series carries `run`, `stage`, `rank`; the anomaly counter adds `kind`.
"""
from __future__ import annotations

import json
import os
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trainguard.workers.contract import STAGE_METRIC_NAMES, WORKER_LABELS, AnomalyKind, MetricName
from trainguard.workers.runtime.gpu import GpuHealth

__all__ = ["Exporter", "STAGE_GAUGES", "CHECKPOINT_STALL"]

# not in the contract (yet): the step loop's share of a checkpoint, next to the background write time
CHECKPOINT_STALL = "trainguard_checkpoint_stall_seconds"

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CKPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# stage metric key (StepResult.metrics / evaluate()) -> gauge name: the contract's table
STAGE_GAUGES = dict(STAGE_METRIC_NAMES)


class _GpuCollector:
    """Reads the GPU provider at scrape time, so counters never miss an increment."""

    def __init__(self, gpu: GpuHealth, labels: tuple[str, str, str]) -> None:
        self.gpu = gpu
        self.labels = list(labels)

    def collect(self) -> Iterable[Any]:
        s = self.gpu.sample()
        names = list(WORKER_LABELS) + ["provider"]
        values = self.labels + [self.gpu.name]
        util = GaugeMetricFamily(MetricName.GPU_UTILIZATION, "GPU utilisation (0..1)", labels=names)
        util.add_metric(values, s.utilization_ratio)
        mem = GaugeMetricFamily(MetricName.GPU_MEMORY_USED, "GPU memory used (bytes)", labels=names)
        mem.add_metric(values, s.memory_used_bytes)
        xid = CounterMetricFamily(MetricName.GPU_XID, "GPU Xid errors seen", labels=names)
        xid.add_metric(values, s.xid_errors)
        ecc = CounterMetricFamily(MetricName.GPU_ECC, "GPU uncorrected ECC errors", labels=names)
        ecc.add_metric(values, s.ecc_errors)
        return [util, mem, xid, ecc]


class Exporter:
    def __init__(self, run: str, stage: str, rank: int, *, registry: CollectorRegistry | None = None,
                 gpu: GpuHealth | None = None, history_size: int = 10_000) -> None:
        self.labels = (run, stage, str(rank))
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, L = self.registry, list(WORKER_LABELS)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, L, registry=r)

        self._gauges: dict[str, Gauge] = {
            MetricName.STEP: gauge(MetricName.STEP, "optimizer step reached"),
            MetricName.TRAIN_LOSS: gauge(MetricName.TRAIN_LOSS, "last training loss"),
            MetricName.GRAD_NORM: gauge(MetricName.GRAD_NORM, "global gradient norm before clipping"),
            MetricName.LEARNING_RATE: gauge(MetricName.LEARNING_RATE, "current learning rate"),
            MetricName.LAST_STEP_TS: gauge(MetricName.LAST_STEP_TS, "unix time of the last finished step"),
            MetricName.SPIKE_SCORE: gauge(MetricName.SPIKE_SCORE, "the guard's robust loss spike score"),
            MetricName.CHECKPOINT_STEP: gauge(MetricName.CHECKPOINT_STEP, "step of the newest checkpoint written"),
            MetricName.CHECKPOINT_BYTES: gauge(MetricName.CHECKPOINT_BYTES, "size of the newest checkpoint (bytes)"),
            MetricName.MODEL_PARAMETERS: gauge(MetricName.MODEL_PARAMETERS, "trainable parameters"),
            MetricName.TOKENS_PER_PARAMETER: gauge(MetricName.TOKENS_PER_PARAMETER, "tokens seen (all ranks) per parameter"),
            MetricName.WORKER_PAUSED: gauge(MetricName.WORKER_PAUSED, "1 while the worker is paused at a step boundary"),
            CHECKPOINT_STALL: gauge(
                CHECKPOINT_STALL,
                "seconds the step loop spent on the last checkpoint (snapshot copy + wait for the previous write)"),
        }
        for key, name in STAGE_GAUGES.items():
            self._gauges[name] = gauge(name, f"stage metric {key}")
        self.tokens = Counter(MetricName.TOKENS, "tokens consumed by this rank", L, registry=r)
        self.step_seconds = Histogram(MetricName.STEP_SECONDS, "wall time per step", L, buckets=STEP_BUCKETS, registry=r)
        self.ckpt_seconds = Histogram(MetricName.CHECKPOINT_SECONDS, "checkpoint write time (background)", L,
                                      buckets=CKPT_BUCKETS, registry=r)
        self.anomalies = Counter(MetricName.ANOMALIES, "anomalies the in-step guard saw", L + ["kind"], registry=r)
        for kind in AnomalyKind:  # every kind exists from the start, so rate() works from 0
            self.anomalies.labels(*self.labels, kind.value)
        # this rank's labelled children, each looked up once, on its first `set` (`labels()` costs
        # a lock and a dict lookup per call, several times in every step). Created lazily: a
        # gauge this stage never sets exports no series (a PPO gauge at 0 on a pretrain stage
        # would read as a collapsed policy ratio)
        self._children: dict[str, Any] = {}
        for name in (MetricName.STEP, MetricName.WORKER_PAUSED, MetricName.LAST_STEP_TS):
            self.set(name, 0)
        self._tokens = self.tokens.labels(*self.labels)
        self._step_seconds: Any = None  # on the first step: no series before it
        self.gpu = gpu
        if gpu is not None:
            r.register(_GpuCollector(gpu, self.labels))
        self._history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._hlock = threading.Lock()
        self._seq = 0
        self._server: ThreadingHTTPServer | None = None
        self.host: str | None = None
        self.port: int | None = None

    # -- updates ---------------------------------------------------------------------
    def set(self, name: str, value: float) -> None:
        child = self._children.get(name)
        if child is None:
            child = self._children[name] = self._gauges[name].labels(*self.labels)
        child.set(value)

    def set_stage_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            name = STAGE_GAUGES.get(key)
            if name is not None and value is not None:
                self.set(name, float(value))

    def count_anomaly(self, kind: AnomalyKind | str) -> None:
        self.anomalies.labels(*self.labels, AnomalyKind(kind).value).inc()

    def anomaly_count(self, kind: AnomalyKind | str) -> float:
        return self.anomalies.labels(*self.labels, AnomalyKind(kind).value)._value.get()

    def observe_step(self, seconds: float, tokens: int) -> None:
        if self._step_seconds is None:
            self._step_seconds = self.step_seconds.labels(*self.labels)
        self._step_seconds.observe(seconds)
        if tokens:
            self._tokens.inc(tokens)

    def observe_checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self.ckpt_seconds.labels(*self.labels).observe(seconds)
        self.set(MetricName.CHECKPOINT_STEP, step)
        self.set(MetricName.CHECKPOINT_BYTES, nbytes)

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Append a per-step record, assigning its `seq`; returns it."""
        with self._hlock:
            self._seq = max(self._seq + 1, int(rec["step"]))
            rec["seq"] = self._seq
            self._history.append(rec)
        return rec

    def last_seq(self) -> int:
        """The seq of the newest record (0 before the first)."""
        with self._hlock:
            return self._seq

    def history(self, since: int = 0) -> list[dict[str, Any]]:
        """Records with seq > since, oldest first."""
        out: list[dict[str, Any]] = []
        with self._hlock:
            for r in reversed(self._history):  # seqs increase: only the newest are read
                if r["seq"] <= since:
                    break
                out.append(r)
        out.reverse()
        return out

    def text(self) -> bytes:
        return generate_latest(self.registry)

    # -- HTTP --------------------------------------------------------------------------
    def start(self, host: str | None = None, port: int = 0) -> int:
        """Serve on `host` (TRAINGUARD_BIND_HOST, default 127.0.0.1), port 0 = any free one."""
        if self._server is not None:
            return self.port  # type: ignore[return-value]
        host = host or os.environ.get("TRAINGUARD_BIND_HOST", "127.0.0.1")
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                url = urlparse(self.path)
                if url.path == "/metrics":
                    body, ctype, code = exporter.text(), CONTENT_TYPE_LATEST, 200
                elif url.path == "/history":
                    try:
                        since = int(parse_qs(url.query).get("since", ["0"])[0])
                    except ValueError:
                        since, code = None, 400
                    if since is None:
                        body, ctype, code = b'{"error": "since must be an integer"}', "application/json", 400
                    else:
                        body = json.dumps(exporter.history(since), allow_nan=True).encode()
                        ctype, code = "application/json", 200
                elif url.path == "/healthz":
                    body, ctype, code = b"ok", "text/plain", 200
                else:
                    body, ctype, code = b"not found", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="exporter", daemon=True).start()
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
