"""The exporter's cheap scrape paths give what the plain ones gave: /metrics is
`generate_latest(registry)` byte for byte (its per-collector cache follows every update), /history
is `json.dumps(history)`, the harness's metrics log line is `json.dumps({**rec, "samples": ...})`,
and a client that connects and stalls holds no other request up (a thread per request), its own
thread ending after REQUEST_TIMEOUT_S."""
from __future__ import annotations

import io
import json
import re
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from trainguard.workers.contract import AnomalyKind, MetricName
from trainguard.workers.runtime import exporter as exporter_module
from trainguard.workers.runtime.exporter import Exporter
from trainguard.workers.runtime.gpu import FakeNvmlGpuHealth
from trainguard.workers.runtime.harness import Harness

ODD_VALUES = [2.5, float("nan"), float("inf"), float("-inf"), 1e22, 1234567.0, -0.0, 5e-324, 0.1]


def steady(text: bytes) -> bytes:
    """The text without the busy counter's value: it is read live, and moves between two reads."""
    return re.sub(rb"(\ntrainguard_process_busy_seconds_total\{[^\n]*\}) [^\n]*\n", rb"\1 _\n", text)


def same_as_library(ex: Exporter) -> str:
    text = ex.text()
    assert steady(text) == steady(generate_latest(ex.registry))
    return text.decode()


@pytest.mark.parametrize("run", ["r", 'we"ird\\run\nü'])
def test_metrics_text_is_generate_latest_after_every_kind_of_update(run: str) -> None:
    gpu = FakeNvmlGpuHealth()
    ex = Exporter(run, "pretrain", 3, gpu=gpu)
    same_as_library(ex)
    for i, v in enumerate(ODD_VALUES * 3):
        ex.set(MetricName.TRAIN_LOSS, v)
        same_as_library(ex)
        ex.observe_step(0.01 * i, 64 if i % 2 else 0)
        same_as_library(ex)
        ex.set_stage_metrics({"val_loss": v, "kl": float(i), "not_a_gauge": 1.0})
        same_as_library(ex)
        if i % 4 == 0:
            ex.count_anomaly(AnomalyKind.LOSS_SPIKE)
            ex.observe_checkpoint(i, 0.3 * i, 1000 + i)
            gpu.inject_xid()
            same_as_library(ex)


def test_a_cached_metrics_text_shows_what_changed_since_the_last_scrape() -> None:
    ex = Exporter("r", "pretrain", 0)
    labels = 'rank="0",run="r",stage="pretrain"'
    ex.set(MetricName.TRAIN_LOSS, 2.5)
    assert f"trainguard_train_loss{{{labels}}} 2.5\n" in ex.text().decode()
    ex.set(MetricName.TRAIN_LOSS, 3.25)  # after the previous scrape rendered the gauge
    assert f"trainguard_train_loss{{{labels}}} 3.25\n" in same_as_library(ex)
    ex.observe_step(0.02, 10)
    ex.text()
    ex.observe_step(0.03, 5)
    text = same_as_library(ex)
    assert f"trainguard_step_seconds_count{{{labels}}} 2.0\n" in text
    assert f"trainguard_tokens_total{{{labels}}} 15.0\n" in text
    ex.count_anomaly(AnomalyKind.NONFINITE_LOSS)
    assert f'trainguard_anomalies_total{{kind="nonfinite_loss",{labels}}} 1.0\n' in same_as_library(ex)
    ex.observe_checkpoint(7, 0.5, 123)
    text = same_as_library(ex)
    assert f"trainguard_checkpoint_step{{{labels}}} 7.0\n" in text
    assert f"trainguard_checkpoint_seconds_count{{{labels}}} 1.0\n" in text


def test_the_gpu_collector_is_read_at_every_scrape() -> None:
    gpu = FakeNvmlGpuHealth()
    ex = Exporter("r", "s", 0, gpu=gpu)
    assert 'trainguard_gpu_xid_errors_total{provider="fake-nvml",rank="0",run="r",stage="s"} 0.0' in ex.text().decode()
    gpu.inject_xid(2)  # changes without any exporter call
    assert 'trainguard_gpu_xid_errors_total{provider="fake-nvml",rank="0",run="r",stage="s"} 2.0' in same_as_library(ex)


def test_collectors_registered_later_and_outside_registries_are_exported() -> None:
    from prometheus_client import Gauge

    ex = Exporter("r", "s", 0)
    extra = Gauge("extra_thing", "registered after the exporter", registry=ex.registry)
    extra.set(4)
    assert "extra_thing 4.0\n" in same_as_library(ex)
    extra.set(5)  # not an exporter call: rendered at every scrape
    assert "extra_thing 5.0\n" in same_as_library(ex)
    ex.registry.unregister(extra)
    assert "extra_thing" not in same_as_library(ex)
    ex.registry.set_target_info({"env": "x"})
    assert "target_info" in same_as_library(ex)

    own = CollectorRegistry()
    ex2 = Exporter("r", "s", 0, registry=own)
    ex2.set(MetricName.TRAIN_LOSS, 1.5)
    assert steady(ex2.text()) == steady(generate_latest(own))


def test_history_json_is_json_dumps_of_the_history() -> None:
    ex = Exporter("r", "s", 0, history_size=6)
    assert ex.history_json(0) == b"[]"
    for step in range(1, 10):
        rec = {"step": step, "loss": ODD_VALUES[step % len(ODD_VALUES)], "anomaly": None, "name": 'q"\\ü'}
        if step % 2:
            assert ex.record_json(rec) == json.dumps(rec)
        else:
            ex.record(rec)
    for since in (-1, 0, 3, 5, 8, 9, 100):
        assert ex.history_json(since) == json.dumps(ex.history(since), allow_nan=True).encode()
    assert [r["seq"] for r in ex.history(0)] == [4, 5, 6, 7, 8, 9]


def test_the_metrics_log_line_is_the_record_with_its_samples(tmp_path) -> None:
    def finish(rec: dict) -> tuple[str, dict]:
        log = io.StringIO()
        h = SimpleNamespace(exporter=Exporter("r", "s", 0), _log=log, sample_range=lambda b: [b * 16, b * 16 + 8])
        Harness._finish_step(h, rec)  # type: ignore[arg-type]
        return log.getvalue(), rec

    line, rec = finish({"step": 3, "batch_index": 2, "loss": float("nan"), "anomaly": None, "lr": 1e-3})
    assert line == json.dumps({**rec, "samples": [32, 40]}) + "\n"
    assert rec["seq"] == 3 and json.loads(line)["samples"] == [32, 40]
    # a record that has a "samples" key of its own: it is overwritten where it stands, as before
    line, rec = finish({"step": 1, "batch_index": 0, "samples": 7, "loss": 1.0})
    assert line == json.dumps({**rec, "samples": [0, 8]}) + "\n"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_endpoints_and_a_stalled_client(monkeypatch) -> None:
    monkeypatch.setattr(exporter_module, "REQUEST_TIMEOUT_S", 30.0)  # longer than _get waits
    ex = Exporter("r", "s", 0)
    port = ex.start("127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        ex.record({"step": 1, "loss": float("nan")})
        assert _get(f"{base}/history?since=0") == (200, b'[{"step": 1, "loss": NaN, "seq": 1}]')
        assert _get(f"{base}/history?since=x")[0] == 400
        assert _get(f"{base}/nothing") == (404, b"not found")
        assert _get(f"{base}/healthz") == (200, b"ok")
        code, body = _get(f"{base}/metrics")
        assert code == 200 and steady(body) == steady(generate_latest(ex.registry))
        with socket.create_connection(("127.0.0.1", port)) as stalled:  # connects, sends half a line
            stalled.sendall(b"GET /metr")
            # answered while the stalled one waits (one thread serving in turn: _get's 5 s timeout)
            assert _get(f"{base}/healthz") == (200, b"ok")
    finally:
        ex.close()


def test_a_stalled_client_is_dropped_after_the_request_timeout(monkeypatch) -> None:
    monkeypatch.setattr(exporter_module, "REQUEST_TIMEOUT_S", 0.3)
    ex = Exporter("r", "s", 0)
    port = ex.start("127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"GET /metr")
            stalled.settimeout(10)
            assert stalled.recv(100) == b""  # the server closed it: its thread does not linger
    finally:
        ex.close()
