"""A fake Grafana HTTP API for the grafana-client adapter tests.

It is a fake because no Grafana server can be installed in this environment (see
DESIGN.md, "Real components"). It speaks real HTTP and checks each request against
Grafana's documented HTTP API, so the adapter and grafana-client are exercised
end to end; it does not render anything:

- every /api request except GET /api/health needs `Authorization: Bearer <token>`
  (https://grafana.com/docs/grafana/latest/developers/http_api/auth/); a missing or
  wrong token answers 401 {"message": "invalid API key"};
- POST /api/dashboards/db (.../http_api/dashboard/#create--update-dashboard): a JSON
  object with `dashboard` (an object with a non-empty `title`, a `uid` of at most 40
  characters, `id` null or absent for create-or-replace by uid) and a boolean
  `overwrite`; `folderUid` and `message` are optional strings. An existing uid
  without overwrite answers 412 (name-exists). Answers {id, uid, url, status,
  version, slug};
- POST /api/annotations (.../http_api/annotations/#create-annotation): `text` a
  non-empty string, `tags` a list of strings, `time` and `timeEnd` integers in
  epoch milliseconds (timeEnd >= time), `dashboardUID` an optional string,
  `panelId` an optional integer. Answers {"message": "Annotation added", "id"};
- GET /api/health answers {"database": "ok", "version": ...} without authentication.

Accepted requests are recorded in `requests`, saved dashboards in `dashboards`
(by uid), annotations in `annotations`.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# 1e11 ms is March 1973; a value in seconds (~1.7e9) or microseconds (~1.7e15) is a unit bug.
_MIN_MS, _MAX_MS = 10**11, 10**14


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafanaServer:
    token: str = "grafana-test-token"
    version: str = "11.2.0"
    requests: list[Recorded] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (status, path, why)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeGrafanaServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------ API checks

    def _save_dashboard(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"message": "bad request data"}
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict):
            return 400, {"message": "dashboard: an object is required"}
        if not isinstance(dashboard.get("title"), str) or not dashboard["title"].strip():
            return 400, {"message": "Dashboard title cannot be empty", "status": "empty-name"}
        if not isinstance(body.get("overwrite"), bool):
            return 400, {"message": "overwrite: a boolean is required"}
        uid = dashboard.get("uid")
        if not isinstance(uid, str) or not uid or len(uid) > 40:
            return 400, {"message": "Dashboard uid must be 1 to 40 characters"}
        if dashboard.get("id") is not None:
            return 404, {"message": "Dashboard not found", "status": "not-found"}  # ids are per instance
        for key in ("folderUid", "message"):
            if key in body and not isinstance(body[key], str):
                return 400, {"message": f"{key}: a string is required"}
        with self._lock:
            if uid in self.dashboards and not body["overwrite"]:
                return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
            version = self._versions.get(uid, 0) + 1
            self._versions[uid] = version
            self.dashboards[uid] = dashboard
            dash_id = list(self.dashboards).index(uid) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", dashboard["title"].lower()).strip("-")
        return 200, {"id": dash_id, "uid": uid, "url": f"/d/{uid}/{slug}", "status": "success",
                     "version": version, "slug": slug}

    def _add_annotation(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"message": "bad request data"}
        if not isinstance(body.get("text"), str) or not body["text"]:
            return 400, {"message": "text: a non-empty string is required"}
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return 400, {"message": "tags: a list of strings is required"}
        for key in ("time", "timeEnd"):
            value = body.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not _MIN_MS <= value <= _MAX_MS:
                return 400, {"message": f"{key}: epoch milliseconds (an integer) required, got {value!r}"}
        if body.get("time") is not None and body.get("timeEnd") is not None and body["timeEnd"] < body["time"]:
            return 400, {"message": "timeEnd before time"}
        if body.get("dashboardUID") is not None and not isinstance(body["dashboardUID"], str):
            return 400, {"message": "dashboardUID: a string is required"}
        if body.get("panelId") is not None and not isinstance(body["panelId"], int):
            return 400, {"message": "panelId: an integer is required"}
        with self._lock:
            self.annotations.append(body)
            ann_id = len(self.annotations)
        return 200, {"message": "Annotation added", "id": ann_id}

    # ------------------------------------------------------------ HTTP plumbing

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _answer(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _reject(self, status: int, payload: dict[str, Any]) -> None:
                fake.rejected.append((status, self.path, payload.get("message", "")))
                self._answer(status, payload)

            def do_GET(self) -> None:
                if self.path == "/api/health":
                    self._answer(200, {"commit": "fake", "database": "ok", "version": fake.version})
                else:
                    self._reject(404, {"message": "Not found"})

            def do_POST(self) -> None:
                auth = self.headers.get("Authorization", "")
                if auth != f"Bearer {fake.token}":
                    self._reject(401, {"message": "invalid API key"})
                    return
                if not self.headers.get("Content-Type", "").startswith("application/json"):
                    self._reject(415, {"message": "Content-Type must be application/json"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError:
                    self._reject(400, {"message": "bad request data"})
                    return
                routes = {"/api/dashboards/db": fake._save_dashboard, "/api/annotations": fake._add_annotation}
                if self.path not in routes:
                    self._reject(404, {"message": "Not found"})
                    return
                status, payload = routes[self.path](body)
                if status == 200:
                    fake.requests.append(Recorded("POST", self.path, dict(self.headers.items()), body))
                    self._answer(status, payload)
                else:
                    self._reject(status, payload)

        return Handler
