"""Per-worker metrics: a private CollectorRegistry, an HTTP server on port 0.

Serves `/metrics` (Prometheus text format) and `/history?since=N` (JSON list of the
per-step records in the ring buffer with `seq > N`). Every record carries `seq`, which
only increases within a worker process and equals `step` until a rollback sends the
step back (replayed steps then get fresh seqs, so a reader's cursor never misses them).
Every series carries `run`, `stage`, `rank`; the anomaly counter adds `kind`.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from trainguard.workers.contract import STAGE_METRIC_NAMES, WORKER_LABELS, AnomalyKind, MetricName
from trainguard.workers.runtime.busy import ProcessBusy
from trainguard.workers.runtime.busy import available as busy_available
from trainguard.workers.runtime.gpu import GpuHealth

__all__ = ["Exporter", "STAGE_GAUGES", "CHECKPOINT_STALL"]

# not in the contract (yet): the step loop's share of a checkpoint, next to the background write time
CHECKPOINT_STALL = "trainguard_checkpoint_stall_seconds"

# per socket operation of a request (the server handles one request at a time)
REQUEST_TIMEOUT_S = 5.0

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


# the busy counter is read afresh only this long after the last step: while steps come the
# heartbeat says enough, and a read (two small files per thread) is not worth its CPU then
BUSY_AFTER_S = 0.2


class _BusyCollector:
    """trainguard_process_busy_seconds_total (workers/runtime/busy.py), read at scrape time
    once the step loop has been quiet for BUSY_AFTER_S; before that the previous reading (a
    counter that lags while steps come, never one that runs ahead)."""

    def __init__(self, exporter: "Exporter") -> None:
        self.exporter = exporter
        self.busy = ProcessBusy()
        self.value: float | None = None

    def collect(self) -> Iterable[Any]:
        if self.value is None or time.time() - self.exporter.last_step_time() >= BUSY_AFTER_S:
            self.value = self.busy.seconds()
        c = CounterMetricFamily(MetricName.PROCESS_BUSY, "seconds the worker process's threads ran or waited to run",
                                labels=list(WORKER_LABELS))
        c.add_metric(list(self.exporter.labels), self.value)
        return [c]


class _Registry(CollectorRegistry):
    """The exporter's own registry: it knows its collectors in registration order (the order
    `collect` yields them), so /metrics can be put together collector by collector."""

    targeted = False  # set_target_info runs in the base __init__, before ours

    def __init__(self) -> None:
        self.order: list[Any] = []
        super().__init__(auto_describe=True)

    def register(self, collector: Any) -> None:
        super().register(collector)
        self.order = [*self.order, collector]  # copied: a scrape may be iterating the old list

    def unregister(self, collector: Any) -> None:
        super().unregister(collector)
        self.order = [c for c in self.order if c is not collector]

    def set_target_info(self, labels: dict[str, str] | None) -> None:
        super().set_target_info(labels)
        self.targeted = bool(labels)


class _One:
    """Collected metrics as a registry, for `generate_latest`."""

    def __init__(self, *metrics: Any) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        return self.metrics


# the samples `generate_latest` puts last, each group under a gauge header of its own
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


class _Text:
    """`generate_latest` of one collector, a few times faster: the text around each value (a
    family's header, a sample's name and labels) is made once, by `generate_latest` itself, and
    kept; only the values are formatted at every scrape. A sample with a timestamp goes the
    library's way."""

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str, str], str] = {}
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}

    def _head(self, name: str, doc: str, typ: str) -> str:
        key = (name, doc, typ)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = generate_latest(_One(Metric(name, doc, typ))).decode()
        return head

    def _prefix(self, name: str, labels: dict[str, str]) -> str:
        key = (name, tuple(labels.items()))
        prefix = self._prefixes.get(key)
        if prefix is None:
            probe = Metric(name, "", "gauge")
            probe.add_sample(name, labels, 0.0)
            line = generate_latest(_One(probe)).decode()[len(self._head(name, "", "gauge")):]
            assert line.endswith(" 0.0\n"), line
            prefix = self._prefixes[key] = line[:-len("0.0\n")]
        return prefix

    def render(self, collector: Any) -> bytes:
        metrics = list(collector.collect())
        try:
            return self._render(metrics)
        except Exception:  # a name or label the probes cannot take: the library's way
            return generate_latest(_One(*metrics))

    def _render(self, metrics: list[Any]) -> bytes:
        out: list[str] = []
        for m in metrics:
            out.append(self._head(m.name, m.documentation, m.type))
            groups: dict[str, list[str]] = {}
            for smp in m.samples:
                if smp.timestamp is not None:
                    return generate_latest(_One(*metrics))
                line = f"{self._prefix(smp.name, smp.labels)}{floatToGoString(smp.value)}\n"
                for suffix in _OM_SUFFIXES:
                    if smp.name == m.name + suffix:
                        groups.setdefault(suffix, []).append(line)
                        break
                else:
                    out.append(line)
            for suffix, lines in sorted(groups.items()):
                out.append(self._head(m.name + suffix, m.documentation, "gauge"))
                out.extend(lines)
        return "".join(out).encode("utf-8")


class Exporter:
    def __init__(self, run: str, stage: str, rank: int, *, registry: CollectorRegistry | None = None,
                 gpu: GpuHealth | None = None, history_size: int = 10_000) -> None:
        self.labels = (run, stage, str(rank))
        self.registry = registry if registry is not None else _Registry()
        r, L = self.registry, list(WORKER_LABELS)
        # /metrics is put together from each collector's text, kept until the collector changes:
        # every update below stamps its metric in `_changed` (a fresh number from `_tick`, after
        # the value changed) and a scrape renders again only the collectors stamped since it last
        # rendered them (most of them do not change between two scrapes). Collectors that are
        # not this exporter's metrics (the GPU collector) are rendered at every scrape.
        self._tick = itertools.count(1)
        self._changed: dict[str, int] = {}
        self._rendered: dict[str, tuple[int, bytes]] = {}
        self._render_lock = threading.Lock()
        self._text = _Text()

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
        # collector -> the name its updates stamp in `_changed`
        self._keys: dict[Any, str] = {g: name for name, g in self._gauges.items()}
        self._keys.update({self.tokens: MetricName.TOKENS, self.step_seconds: MetricName.STEP_SECONDS,
                           self.ckpt_seconds: MetricName.CHECKPOINT_SECONDS, self.anomalies: MetricName.ANOMALIES})
        self.gpu = gpu
        if gpu is not None:
            r.register(_GpuCollector(gpu, self.labels))
        if busy_available():
            r.register(_BusyCollector(self))
        # [seq, record, its JSON text or None until first needed]: a record is final once recorded
        self._history: deque[list[Any]] = deque(maxlen=history_size)
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
        self._changed[name] = next(self._tick)

    def last_step_time(self) -> float:
        """The heartbeat: unix time of the last finished step (0 before the first)."""
        return float(self._children[MetricName.LAST_STEP_TS]._value.get())

    def set_stage_metrics(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            name = STAGE_GAUGES.get(key)
            if name is not None and value is not None:
                self.set(name, float(value))

    def count_anomaly(self, kind: AnomalyKind | str) -> None:
        self.anomalies.labels(*self.labels, AnomalyKind(kind).value).inc()
        self._changed[MetricName.ANOMALIES] = next(self._tick)

    def anomaly_count(self, kind: AnomalyKind | str) -> float:
        return self.anomalies.labels(*self.labels, AnomalyKind(kind).value)._value.get()

    def observe_step(self, seconds: float, tokens: int) -> None:
        if self._step_seconds is None:
            self._step_seconds = self.step_seconds.labels(*self.labels)
        self._step_seconds.observe(seconds)
        self._changed[MetricName.STEP_SECONDS] = next(self._tick)
        if tokens:
            self._tokens.inc(tokens)
            self._changed[MetricName.TOKENS] = next(self._tick)

    def observe_checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self.ckpt_seconds.labels(*self.labels).observe(seconds)
        self._changed[MetricName.CHECKPOINT_SECONDS] = next(self._tick)
        self.set(MetricName.CHECKPOINT_STEP, step)
        self.set(MetricName.CHECKPOINT_BYTES, nbytes)

    def record(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Append a per-step record, assigning its `seq`; returns it. The record must not change
        afterwards (/history may serve a copy encoded earlier)."""
        self._append(rec, encode=False)
        return rec

    def record_json(self, rec: dict[str, Any]) -> str:
        """`record`, returning the record's JSON text (`json.dumps(rec)`, seq included): /history
        serves that same text, so a caller that writes the record out encodes it only once."""
        text = self._append(rec, encode=True)
        assert text is not None
        return text

    def _append(self, rec: dict[str, Any], *, encode: bool) -> str | None:
        with self._hlock:
            self._seq = max(self._seq + 1, int(rec["step"]))
            rec["seq"] = self._seq
            entry: list[Any] = [self._seq, rec, None]
            self._history.append(entry)
            if encode:
                entry[2] = json.dumps(rec, allow_nan=True)
            return entry[2]  # type: ignore[no-any-return]

    def last_seq(self) -> int:
        """The seq of the newest record (0 before the first)."""
        with self._hlock:
            return self._seq

    def history(self, since: int = 0) -> list[dict[str, Any]]:
        """Records with seq > since, oldest first."""
        out: list[dict[str, Any]] = []
        with self._hlock:
            for e in reversed(self._history):  # seqs increase: only the newest are read
                if e[0] <= since:
                    break
                out.append(e[1])
        out.reverse()
        return out

    def history_json(self, since: int = 0) -> bytes:
        """`json.dumps(self.history(since), allow_nan=True)`, encoded: from each record's JSON
        text, made once per record."""
        texts: list[str] = []
        with self._hlock:
            for e in reversed(self._history):
                if e[0] <= since:
                    break
                if e[2] is None:
                    e[2] = json.dumps(e[1], allow_nan=True)
                texts.append(e[2])
        texts.reverse()
        return ("[" + ", ".join(texts) + "]").encode()

    def text(self) -> bytes:
        """`generate_latest(self.registry)`."""
        reg = self.registry
        if not isinstance(reg, _Registry) or reg.targeted:
            return generate_latest(reg)
        parts: list[bytes] = []
        with self._render_lock:  # two scrapes at once would render the same collectors twice
            for c in reg.order:
                key = self._keys.get(c)
                if key is None:
                    parts.append(self._text.render(c))
                    continue
                stamp = self._changed.get(key, 0)  # read before rendering: a later change re-renders
                done = self._rendered.get(key)
                if done is None or done[0] != stamp:
                    done = self._rendered[key] = (stamp, self._text.render(c))
                parts.append(done[1])
        return b"".join(parts)

    # -- HTTP --------------------------------------------------------------------------
    def start(self, host: str | None = None, port: int = 0) -> int:
        """Serve on `host` (TRAINGUARD_BIND_HOST, default 127.0.0.1), port 0 = any free one."""
        if self._server is not None:
            return self.port  # type: ignore[return-value]
        host = host or os.environ.get("TRAINGUARD_BIND_HOST", "127.0.0.1")
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            wbufsize = 1 << 16  # the status line, headers and body leave in one send
            timeout = REQUEST_TIMEOUT_S  # per socket operation: a stalled client's thread ends after it

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
                        body = exporter.history_json(since)
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

        # a thread per request: one server thread serving requests in turn saved ~0.3 ms of CPU
        # per scrape, but a client that connects and stalls (an exporter bound beyond localhost
        # is reachable by anything on the network) would then hold every scrape up, the
        # supervisor's heartbeat reads included (a false hang)
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
