"""The Grafana adapter over real HTTP against FakeGrafanaServer (no Grafana server here)."""
from __future__ import annotations

import argparse
import json
import time

import pytest

from trainguard.service.adapters.grafana import (
    GrafanaAuthError,
    GrafanaClient,
    GrafanaError,
    add_dashboards_parser,
    annotate,
    annotation_tags,
    push_dashboards,
    run_dashboards,
)
from trainguard.service.adapters.promql_inventory import DASHBOARD_DIR
from tests.conftest import free_port
from tests.integration.deploy.fake_grafana import FakeGrafanaServer

pytestmark = pytest.mark.integration


@pytest.fixture
def grafana():
    with FakeGrafanaServer() as server:
        yield server


def _files() -> dict[str, dict]:
    out = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        out[d["uid"]] = d
    return out


def test_push_dashboards_saves_every_file_unchanged(grafana):
    uids = push_dashboards(grafana.url, grafana.token, DASHBOARD_DIR)

    files = _files()
    assert sorted(uids) == sorted(files) and len(files) == 2
    assert grafana.rejected == []
    for req in grafana.requests:
        assert req.path == "/api/dashboards/db"
        assert req.headers["Authorization"] == f"Bearer {grafana.token}"
        assert req.body["overwrite"] is True
        assert {k: v for k, v in req.body["dashboard"].items() if k != "id"} == files[req.body["dashboard"]["uid"]]
    assert {uid: {k: v for k, v in d.items() if k != "id"} for uid, d in grafana.dashboards.items()} == files


def test_push_twice_overwrites_by_uid(grafana):
    push_dashboards(grafana.url, grafana.token, DASHBOARD_DIR)
    push_dashboards(grafana.url, grafana.token, DASHBOARD_DIR, folder_uid="trainguard")

    assert len(grafana.dashboards) == 2
    assert grafana.rejected == []
    assert [r.body.get("folderUid") for r in grafana.requests[2:]] == ["trainguard", "trainguard"]


def test_bad_token_is_a_clear_auth_error(grafana):
    with pytest.raises(GrafanaAuthError, match=r"rejected the token .*\(401\): invalid API key"):
        push_dashboards(grafana.url, "not-the-token", DASHBOARD_DIR)
    assert grafana.dashboards == {}
    assert grafana.rejected and grafana.rejected[0][0] == 401


def test_unreachable_grafana_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GrafanaError, match="could not"):
        push_dashboards(url, "token", DASHBOARD_DIR)


def test_annotate_posts_epoch_milliseconds_and_tags(grafana):
    now_ms = int(time.time() * 1000)
    tags = annotation_tags("incident", run="run-1", stage="pretrain", kind="loss_spike")

    ann_id = annotate(grafana.url, grafana.token, text="loss spike at step 120: rolled back to step 100",
                      tags=tags, time_ms=now_ms, dashboard_uid="trainguard-training-runs")

    assert ann_id == 1
    assert grafana.rejected == []
    (body,) = grafana.annotations
    assert body["time"] == body["timeEnd"] == now_ms
    assert body["tags"] == ["trainguard", "incident", "run:run-1", "stage:pretrain", "kind:loss_spike"]
    assert body["text"].startswith("loss spike")
    assert body["dashboardUID"] == "trainguard-training-runs"


def test_annotation_in_seconds_is_refused(grafana):
    client = GrafanaClient(grafana.url, grafana.token)
    with pytest.raises(GrafanaError, match="400"):
        client.annotate(text="rollback", tags=["trainguard"], time_ms=int(time.time()))


def test_dashboards_annotation_queries_match_the_tag_convention():
    """The dashboards find the supervisor's annotations: their tag queries are a subset."""
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        for ann in json.loads(path.read_text())["annotations"]["list"]:
            if ann.get("target", {}).get("type") != "tags":
                continue
            wanted = {t.replace("$run", "run-1") for t in ann["target"]["tags"]}
            event = "incident" if "incident" in wanted else "rollback"
            assert wanted <= set(annotation_tags(event, run="run-1", stage="sft", kind="nan")), (path.name, ann["name"])


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainguard")
    add_dashboards_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_dashboards_push(grafana, capsys):
    args = _cli(["dashboards", "push", "--url", grafana.url, "--token", grafana.token])

    assert args.func(args) == 0

    out = capsys.readouterr().out.split()
    assert sorted(out) == sorted(f"{grafana.url}/d/{uid}" for uid in _files())


def test_cli_dashboards_push_bad_token_exits_1(grafana, capsys):
    args = _cli(["dashboards", "push", "--url", grafana.url, "--token", "wrong"])

    assert run_dashboards(args) == 1

    assert "rejected the token" in capsys.readouterr().err


def test_cli_dashboards_push_needs_url_and_token(monkeypatch, capsys):
    monkeypatch.delenv("TRAINGUARD_GRAFANA_URL", raising=False)
    monkeypatch.delenv("TRAINGUARD_GRAFANA_TOKEN", raising=False)
    args = _cli(["dashboards", "push"])

    assert run_dashboards(args) == 2
    assert "--url and --token" in capsys.readouterr().err


def test_trainguard_cli_wires_dashboards_push(grafana, capsys):
    from trainguard.service.cli import main

    assert main(["dashboards", "push", "--url", grafana.url, "--token", grafana.token]) == 0
    assert len(grafana.dashboards) == 2
