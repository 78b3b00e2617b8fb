"""End-to-end fixtures: the real Prometheus and Alertmanager binaries, configured from deploy/,
in front of a real supervisor (Controller + scheduler + REST API under uvicorn) and real Ray workers.

Everything listens on free loopback ports in a temp directory. The configs are *derived* from
the shipped files -- deploy/prometheus/prometheus.yml, deploy/prometheus/rules/*.yml and
deploy/alertmanager/alertmanager.yml are loaded and only these things are rewritten:

prometheus.yml
  - global scrape_interval / scrape_timeout / evaluation_interval -> 1s (a short CPU run
    must produce enough samples; the file itself says the e2e test does this);
  - rule_files -> the rewritten copies of deploy/prometheus/rules/*.yml (below);
  - alerting -> the test Alertmanager;
  - job "trainguard": http_sd_configs url -> the test supervisor's /api/v1/sd,
    refresh_interval -> 1s, credentials_file -> a file holding the test viewer token;
    its relabel_configs are kept as shipped;
  - job "prometheus": its own address.
rules (RULE_OVERRIDES, the only threshold changes)
  - TrainguardLossSpike `for: 10s` -> `for: 0s`: a spike of a tiny CPU run lasts a couple of
    seconds before it is rolled back; with the shipped 10 s the condition would have to hold
    through ten 1 s evaluations. Every expression is used unchanged.
alertmanager.yml
  - every route's group_wait -> 0s and group_interval -> 1s (repeat_interval unchanged): the
    alert of a spike that the rollback ends within a second fires for one or two evaluations;
    Alertmanager drops a group whose alerts all resolved before its first notification;
  - receiver trainguard-supervisor: url -> the test supervisor's /api/v1/alerts,
    credentials_file -> a file holding the test webhook token;
  - receiver pager: url -> `PagerSink`, a local HTTP server that records what it gets.

The supervisor is started per test (`stack.supervisor(...)`, different Settings per test) on
one fixed port, so the one Prometheus and Alertmanager of the module keep discovering and
posting to it. Failures carry the tail of both binaries' logs (`stack.diag()`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import uvicorn
import yaml

from tests.support import REPO_ROOT
from trainguard.service.adapters.promql_inventory import RULES_DIR
from trainguard.service.api import create_app
from tests.conftest import free_port, require_binary, wait_for
from tests.support import stop_process
from tests.integration.supervisor.harness import running_controller

DEPLOY = REPO_ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"

# alert name -> fields replaced in the loaded rule (documented in the module docstring).
RULE_OVERRIDES: dict[str, dict[str, Any]] = {
    "TrainguardLossSpike": {"for": "0s"},
}


# ---- small HTTP helpers ------------------------------------------------------------------------

class PagerSink:
    """Stands in for the paging system: records every Alertmanager webhook POST it gets."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsable": body.decode(errors="replace")}
                with sink._lock:
                    sink.received.append({"path": self.path, "payload": payload})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/pager"
        self._thread = threading.Thread(target=self._server.serve_forever, name="pager-sink", daemon=True)
        self._thread.start()

    def alerts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [a for r in self.received for a in r["payload"].get("alerts", [])]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class WebhookTap:
    """ASGI wrapper around the supervisor app: records each body POSTed to /api/v1/alerts and
    the status answered, so a test can wait for Alertmanager's notifications (firing and
    resolved) instead of sleeping. The app itself is unchanged."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.posts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/alerts"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        status: list[int] = []

        async def tapped_receive() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
            return msg

        async def tapped_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)

        try:
            await self.app(scope, tapped_receive, tapped_send)
        finally:
            try:
                payload = json.loads(b"".join(chunks))
            except ValueError:
                payload = None
            with self._lock:
                self.posts.append({"status": status[0] if status else None, "payload": payload})

    def alerts(self, **labels: str) -> list[dict[str, Any]]:
        """Every alert of every recorded post whose labels include `labels`, with the answer's status."""
        with self._lock:
            posts = list(self.posts)
        return [{**a, "_http_status": p["status"]} for p in posts for a in (p["payload"] or {}).get("alerts", [])
                if all(a.get("labels", {}).get(k) == v for k, v in labels.items())]


# ---- processes ---------------------------------------------------------------------------------

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<{self.name} log unreadable: {e}>"
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        stop_process(self.popen)


def _start(name: str, argv: list[str], tmp: Path) -> Proc:
    log_path = tmp / f"{name}.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Proc(name, popen, log_path)


def _wait_ready(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            r = httpx.get(f"{url}/-/ready", timeout=1)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise AssertionError(f"{proc.name} not ready at {url} after {timeout}s ({last}):\n{proc.tail()}")


# ---- config derivation -------------------------------------------------------------------------

def derive_rules(out_dir: Path) -> list[Path]:
    """Copies of deploy/prometheus/rules/*.yml with RULE_OVERRIDES applied."""
    out_dir.mkdir(parents=True, exist_ok=True)
    applied: set[str] = set()
    paths = []
    for src in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(src.read_text())
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                name = rule.get("alert")
                if name in RULE_OVERRIDES:
                    rule.update(RULE_OVERRIDES[name])
                    applied.add(name)
        dst = out_dir / src.name
        dst.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(dst)
    missing = set(RULE_OVERRIDES) - applied
    assert not missing, f"RULE_OVERRIDES name alerts that deploy/prometheus/rules no longer has: {missing}"
    return paths


def derive_prometheus_config(*, prom_port: int, am_port: int, sd_url: str, token_file: Path,
                             rule_files: list[Path]) -> dict[str, Any]:
    cfg = copy.deepcopy(yaml.safe_load(PROM_CONFIG.read_text()))
    cfg["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = [str(p) for p in rule_files]
    (am,) = cfg["alerting"]["alertmanagers"]
    (static,) = am["static_configs"]
    static["targets"] = [f"127.0.0.1:{am_port}"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"trainguard", "prometheus"}, f"deploy/prometheus/prometheus.yml jobs changed: {set(jobs)}"
    (sd,) = jobs["trainguard"]["http_sd_configs"]
    assert sd["url"].endswith("/api/v1/sd"), sd
    sd["url"] = sd_url
    sd["refresh_interval"] = "1s"
    assert sd["authorization"]["type"] == "Bearer"
    sd["authorization"]["credentials_file"] = str(token_file)
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    return cfg


def derive_alertmanager_config(*, webhook_url: str, token_file: Path, pager_url: str) -> dict[str, Any]:
    cfg = copy.deepcopy(yaml.safe_load(AM_CONFIG.read_text()))

    def shorten(route: dict[str, Any]) -> None:
        route["group_wait"] = "0s"
        route["group_interval"] = "1s"
        for child in route.get("routes") or []:
            shorten(child)

    shorten(cfg["route"])
    receivers = {r["name"]: r for r in cfg["receivers"]}
    (hook,) = receivers["trainguard-supervisor"]["webhook_configs"]
    assert hook["url"].endswith("/api/v1/alerts"), hook
    hook["url"] = webhook_url
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    for h in receivers["pager"]["webhook_configs"]:
        h["url"] = pager_url
    return cfg


# ---- the stack ---------------------------------------------------------------------------------

@dataclass
class Stack:
    tmp: Path
    prom_url: str
    am_url: str
    sup_port: int
    tokens: dict[str, str]
    pager: PagerSink
    procs: list[Proc]
    tap: WebhookTap | None = None
    started: float = field(default_factory=time.time)

    @property
    def sup_url(self) -> str:
        return f"http://127.0.0.1:{self.sup_port}"

    # -- diagnostics
    def diag(self, lines: int = 30) -> str:
        parts = []
        for p in self.procs:
            state = "running" if p.popen.poll() is None else f"exited {p.popen.returncode}"
            parts.append(f"--- {p.name} ({state}) log tail:\n{p.tail(lines)}")
        if self.tap is not None:
            parts.append(f"--- webhook posts to the supervisor: {json.dumps(self._brief(self.tap.posts))}")
        parts.append(f"--- pager sink got: {json.dumps(self._brief(self.pager.received))}")
        try:
            targets = [{"labels": t["labels"], "health": t["health"], "lastError": t.get("lastError"),
                        "scrapeUrl": t.get("scrapeUrl")} for t in self.targets()]
            parts.append(f"--- Prometheus targets: {json.dumps(targets)}")
        except Exception as e:  # noqa: BLE001 - diagnostics must not fail the report
            parts.append(f"--- Prometheus targets unavailable: {e!r}")
        return "\n".join(parts)

    @staticmethod
    def _brief(posts: list[dict]) -> list:
        out = []
        for p in posts[-20:]:
            payload = p.get("payload") or {}
            out.append({"status": p.get("status"), "alerts": [
                {"status": a.get("status"), "labels": a.get("labels"), "fp": a.get("fingerprint")}
                for a in payload.get("alerts", [])]})
        return out

    def wait(self, cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
             context: Callable[[], Any] | None = None) -> Any:
        """Poll `cond` until truthy; on timeout fail with `what`, `context()` and the binaries' log tails."""
        def detail() -> str:
            head = ""
            if context is not None:
                try:
                    head = f"--- context: {context()}\n"
                except Exception as e:  # noqa: BLE001
                    head = f"--- context unavailable: {e!r}\n"
            return head + self.diag()

        return wait_for(cond, timeout, interval=interval, what=what, detail=detail)

    # -- Prometheus / Alertmanager API
    def query(self, expr: str, **params: Any) -> list[dict]:
        r = httpx.get(f"{self.prom_url}/api/v1/query", params={"query": expr, **params}, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        r = httpx.get(f"{self.prom_url}/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": step}, timeout=20)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def targets(self) -> list[dict]:
        return httpx.get(f"{self.prom_url}/api/v1/targets", params={"state": "active"},
                         timeout=5).json()["data"]["activeTargets"]

    def sd(self) -> Any:
        """What the supervisor's /api/v1/sd answers Prometheus now."""
        return httpx.get(f"{self.sup_url}/api/v1/sd", timeout=5,
                         headers={"Authorization": f"Bearer {self.tokens['viewer']}"}).json()

    def run_context(self, client: httpx.Client, run_id: str) -> dict[str, Any]:
        """The run, its recent events and the SD answer: for failure messages."""
        return {"run": client.get(f"/runs/{run_id}").json(),
                "events": [(e["kind"], e.get("detail"), e.get("result"))
                           for e in client.get(f"/runs/{run_id}/events").json().get("data", [])][-12:],
                "sd": self.sd(),
                "prometheus_targets": [(t["labels"], t["health"], t.get("lastError")) for t in self.targets()]}

    def worker_targets(self, run: str, *, up: bool = True) -> list[dict]:
        return [t for t in self.targets() if t["labels"].get("run") == run
                and t["labels"].get("job") == "trainguard-workers" and (not up or t["health"] == "up")]

    def am_alerts(self, **labels: str) -> list[dict]:
        r = httpx.get(f"{self.am_url}/api/v2/alerts", timeout=5)
        r.raise_for_status()
        return [a for a in r.json() if all(a["labels"].get(k) == v for k, v in labels.items())]

    # -- the supervisor under test
    @contextlib.contextmanager
    def supervisor(self, state_dir: Path, **settings: Any) -> Iterator[tuple[Any, httpx.Client]]:
        """A real Controller + scheduler + REST API on the stack's supervisor port.

        Yields (controller, client); the client talks to /api/v1 with the operator token."""
        opts = {"port": self.sup_port, "host": "127.0.0.1", "viewer_token": self.tokens["viewer"],
                "operator_token": self.tokens["operator"], "webhook_token": self.tokens["webhook"]}
        opts.update(settings)
        with running_controller(state_dir, **opts) as ctl:
            app = create_app(ctl.settings, ctl, engine=getattr(ctl, "engine", None))
            self.tap = WebhookTap(app)
            server = uvicorn.Server(uvicorn.Config(self.tap, host="127.0.0.1", port=self.sup_port,
                                                   log_level="warning", lifespan="off"))
            th = threading.Thread(target=server.run, name="uvicorn-supervisor", daemon=True)
            th.start()
            try:
                self.wait(lambda: server.started or not th.is_alive(), 15, "supervisor API start")
                assert server.started, "uvicorn did not start (port in use?)"
                headers = {"Authorization": f"Bearer {self.tokens['operator']}"}
                with httpx.Client(base_url=f"{self.sup_url}/api/v1", headers=headers, timeout=30) as client:
                    yield ctl, client
            finally:
                server.should_exit = True
                th.join(15)


@pytest.fixture(scope="module")
def stack(ray_session, tmp_path_factory) -> Iterator[Stack]:
    prom_bin = require_binary("prometheus")
    am_bin = require_binary("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("e2e-stack")
    prom_port, am_port, am_cluster_port, sup_port = free_port(), free_port(), free_port(), free_port()
    tokens = {k: f"e2e-{k}-{secrets.token_hex(8)}" for k in ("viewer", "operator", "webhook")}
    (tmp / "viewer-token").write_text(tokens["viewer"] + "\n")
    (tmp / "webhook-token").write_text(tokens["webhook"] + "\n")
    pager = PagerSink()

    prom_cfg = derive_prometheus_config(
        prom_port=prom_port, am_port=am_port, sd_url=f"http://127.0.0.1:{sup_port}/api/v1/sd",
        token_file=tmp / "viewer-token", rule_files=derive_rules(tmp / "rules"))
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg, sort_keys=False))
    am_cfg = derive_alertmanager_config(webhook_url=f"http://127.0.0.1:{sup_port}/api/v1/alerts",
                                        token_file=tmp / "webhook-token", pager_url=pager.url)
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(am_cfg, sort_keys=False))

    procs: list[Proc] = []
    try:
        am = _start("alertmanager", [
            am_bin, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            # no gossip: a single instance (0.25 would otherwise bind 0.0.0.0:9094)
            "--cluster.listen-address=", f"--cluster.advertise-address=127.0.0.1:{am_cluster_port}",
        ], tmp)
        procs.append(am)
        prom = _start("prometheus", [
            prom_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--web.enable-lifecycle",
        ], tmp)
        procs.append(prom)
        _wait_ready(am, f"http://127.0.0.1:{am_port}", 30)
        _wait_ready(prom, f"http://127.0.0.1:{prom_port}", 30)
        st = Stack(tmp=tmp, prom_url=f"http://127.0.0.1:{prom_port}", am_url=f"http://127.0.0.1:{am_port}",
                   sup_port=sup_port, tokens=tokens, pager=pager, procs=procs)
        yield st
    finally:
        for p in procs:
            p.stop()
        pager.close()
