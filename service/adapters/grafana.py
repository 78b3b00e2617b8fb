"""Grafana: push the dashboards in dashboards/ and annotate incidents and rollbacks.

A thin wrapper over grafana-client (`GrafanaApi`). Dashboards are also provisioned
as files (deploy/grafana/provisioning/); pushing through the HTTP API is for a
Grafana you do not provision, e.g. a shared company instance:

    trainguard dashboards push --url https://grafana.example.com --token "$TOKEN"

Annotation tags follow one convention, so the dashboards' tag queries find them:
`annotation_tags("incident", run=..., stage=..., kind=...)`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

from trainguard.service.adapters.promql_inventory import DASHBOARD_DIR

__all__ = [
    "GrafanaError",
    "GrafanaAuthError",
    "GrafanaClient",
    "annotation_tags",
    "load_dashboards",
    "push_dashboards",
    "annotate",
    "BackgroundAnnotator",
    "add_dashboards_parser",
    "run_dashboards",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0


class GrafanaError(RuntimeError):
    """Grafana refused a request or could not be reached; the message says which and why."""


class GrafanaAuthError(GrafanaError):
    """Grafana rejected the token (401/403): a permanent error, retrying will not help."""


def annotation_tags(
    event: Literal["incident", "rollback", "proposal"], *, run: str, stage: str | None = None,
    kind: str | None = None, state: str | None = None,
) -> list[str]:
    """Tags for an incident, rollback or recovery-proposal annotation; the dashboards query by
    these. `state`: a proposal's (proposed, approved, rejected, expired, superseded)."""
    tags = ["trainguard", event, f"run:{run}"]
    if stage:
        tags.append(f"stage:{stage}")
    if kind:
        tags.append(f"kind:{kind}")
    if state:
        tags.append(f"state:{state}")
    return tags


def load_dashboards(dashboard_dir: str | Path = DASHBOARD_DIR) -> list[dict[str, Any]]:
    """Every dashboard JSON file of `dashboard_dir`, sorted by file name; each must have a uid and title."""
    out = []
    for path in sorted(Path(dashboard_dir).glob("*.json")):
        dashboard = json.loads(path.read_text())
        missing = [k for k in ("uid", "title") if not dashboard.get(k)]
        if missing:
            raise ValueError(f"{path}: dashboard has no {', '.join(missing)}")
        out.append(dashboard)
    if not out:
        raise ValueError(f"no dashboard JSON files in {dashboard_dir}")
    return out


class GrafanaClient:
    """One Grafana instance, authenticated with a service-account token (Bearer)."""

    def __init__(self, url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S, api: GrafanaApi | None = None):
        if not token:
            raise ValueError("a Grafana service-account token is required")
        self.url = url.rstrip("/")
        self._api = api or GrafanaApi.from_url(self.url, credential=token, timeout=timeout)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GrafanaUnauthorizedError as e:
            raise GrafanaAuthError(f"Grafana at {self.url} rejected the token while trying to {what} (401): "
                                   f"{_message(e)}") from e
        except GrafanaClientError as e:
            if e.status_code == 403:
                raise GrafanaAuthError(f"the token may not {what} on Grafana at {self.url} (403): "
                                       f"{_message(e)}; it needs the Editor role") from e
            raise GrafanaError(f"Grafana at {self.url} refused to {what} ({e.status_code}): {_message(e)}") from e
        except GrafanaException as e:
            raise GrafanaError(f"could not {what} on Grafana at {self.url}: {_message(e)}") from e
        except OSError as e:  # connection refused, DNS: niquests' errors are OSErrors
            raise GrafanaError(f"could not reach Grafana at {self.url} to {what}: {e}") from e

    def health(self) -> dict[str, Any]:
        """GET /api/health (no authentication needed): {"database": "ok", "version": ...}."""
        return self._call("check health", self._api.client.GET, "/health")

    def push_dashboard(self, dashboard: dict[str, Any], *, folder_uid: str | None = None,
                       message: str = "pushed by trainguard") -> str:
        """Create or overwrite the dashboard with the same uid; returns the uid Grafana answers."""
        # A file dashboard's numeric id (if any) belongs to some other Grafana; the
        # uid identifies it, and id null + overwrite means "create or replace by uid".
        body: dict[str, Any] = {"dashboard": {**dashboard, "id": None}, "overwrite": True, "message": message}
        if folder_uid:
            body["folderUid"] = folder_uid
        result = self._call(f"save dashboard {dashboard.get('uid')!r}", self._api.dashboard.update_dashboard, body)
        return result.get("uid", dashboard["uid"])

    def annotate(self, *, text: str, tags: list[str], time_ms: int, time_end_ms: int | None = None,
                 dashboard_uid: str | None = None, panel_id: int | None = None) -> int | None:
        """POST /api/annotations. Without a dashboard uid the annotation is organisation-wide
        (found by tag queries on every dashboard). Returns the annotation id."""
        result = self._call(
            "add an annotation", self._api.annotations.add_annotation,
            dashboard_uid=dashboard_uid, panel_id=panel_id, time_from=int(time_ms),
            time_to=int(time_end_ms if time_end_ms is not None else time_ms), tags=list(tags), text=text,
        )
        return result.get("id")


class BackgroundAnnotator:
    """Adds annotations off the caller's thread, one at a time: a recovery decision never waits
    on Grafana, and a Grafana that is down costs a logged warning, nothing more."""

    def __init__(self, client: GrafanaClient) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grafana-annotate")
        self._last: Future[Any] | None = None

    def post(self, *, text: str, tags: list[str], time_ms: int | None = None) -> Future[Any]:
        at = int(time.time() * 1000) if time_ms is None else int(time_ms)
        self._last = self._pool.submit(self._post, text, list(tags), at)
        return self._last

    def _post(self, text: str, tags: list[str], at: int) -> int | None:
        try:
            return self.client.annotate(text=text, tags=tags, time_ms=at)
        except GrafanaError as e:
            log.warning("Grafana annotation %r not added: %s", text[:80], e)
            return None

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what was posted so far has been sent (tests, shutdown)."""
        if self._last is not None:
            self._last.result(timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def _message(e: GrafanaException) -> str:
    response = getattr(e, "response", None)
    if isinstance(response, dict) and response.get("message"):
        return str(response["message"])
    return str(getattr(e, "message", None) or e)


def push_dashboards(url: str, token: str, dashboard_dir: str | Path = DASHBOARD_DIR, *,
                    folder_uid: str | None = None) -> list[str]:
    """Push every dashboard of `dashboard_dir` to Grafana (create or overwrite); returns their uids."""
    dashboards = load_dashboards(dashboard_dir)
    client = GrafanaClient(url, token)
    client.health()  # fail with "could not reach" before the first write
    uids = [client.push_dashboard(d, folder_uid=folder_uid) for d in dashboards]
    log.info("pushed %d dashboards to %s: %s", len(uids), url, ", ".join(uids))
    return uids


def annotate(url: str, token: str, *, text: str, tags: list[str], time_ms: int,
             dashboard_uid: str | None = None) -> int | None:
    """Add one annotation (an incident, a rollback) at `time_ms` (Unix epoch milliseconds)."""
    return GrafanaClient(url, token).annotate(text=text, tags=tags, time_ms=time_ms, dashboard_uid=dashboard_uid)


# ------------------------------------------------------------------------- CLI

def add_dashboards_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`trainguard dashboards push [--url] [--token] [--dir] [--folder-uid]`."""
    parser = subparsers.add_parser("dashboards", help="Grafana dashboards")
    sub = parser.add_subparsers(dest="dashboards_command", required=True)
    push = sub.add_parser("push", help="create or overwrite the dashboards on a Grafana server")
    push.add_argument("--url", default=os.environ.get("TRAINGUARD_GRAFANA_URL"),
                      help="Grafana base URL (default: $TRAINGUARD_GRAFANA_URL)")
    push.add_argument("--token", default=os.environ.get("TRAINGUARD_GRAFANA_TOKEN"),
                      help="service-account token with the Editor role (default: $TRAINGUARD_GRAFANA_TOKEN)")
    push.add_argument("--dir", type=Path, default=DASHBOARD_DIR, help=f"dashboard JSON folder (default: {DASHBOARD_DIR})")
    push.add_argument("--folder-uid", default=None, help="Grafana folder uid (default: the General folder)")
    parser.set_defaults(func=run_dashboards)
    return parser


def run_dashboards(args: argparse.Namespace) -> int:
    """Carry out `trainguard dashboards ...`; returns the process exit code."""
    if args.dashboards_command != "push":  # argparse enforces the choice; kept for direct callers
        raise ValueError(f"unknown dashboards command {args.dashboards_command!r}")
    if not args.url or not args.token:
        print("trainguard dashboards push: --url and --token (or TRAINGUARD_GRAFANA_URL and "
              "TRAINGUARD_GRAFANA_TOKEN) are required", file=sys.stderr)
        return 2
    try:
        uids = push_dashboards(args.url, args.token, args.dir or DASHBOARD_DIR, folder_uid=args.folder_uid)
    except (GrafanaError, ValueError) as e:
        print(f"trainguard dashboards push: {e}", file=sys.stderr)
        return 1
    for uid in uids:
        print(f"{args.url.rstrip('/')}/d/{uid}")
    return 0
