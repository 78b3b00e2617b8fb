"""deploy/prometheus and deploy/alertmanager with the real promtool, amtool and Prometheus."""
from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import REPO_ROOT
from trainguard.service.adapters.promql_inventory import (
    DASHBOARD_DIR,
    RULES_DIR,
    iter_dashboard_queries,
    iter_rule_exprs,
    render_expr,
)
from tests.conftest import free_port, require_binary, wait_for
from tests.support import stop_process

pytestmark = pytest.mark.integration

DEPLOY = REPO_ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_check_config_from_another_directory(tmp_path):
    promtool = require_binary("promtool")
    # From an unrelated cwd: rule_files must resolve relative to the config file.
    r = _run(promtool, "check", "config", str(PROM_CONFIG), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rule files found" in r.stdout + r.stderr


def test_credentials_files_resolve_relative_to_their_config():
    # promtool 2.42 does not check http_sd_configs' credentials_file; Prometheus
    # would fail at the first SD refresh, so check here.
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    (sd,) = [j for j in prom["scrape_configs"] if j["job_name"] == "trainguard"][0]["http_sd_configs"]
    assert sd["url"].endswith("/api/v1/sd")
    assert sd["authorization"]["type"] == "Bearer"
    assert (PROM_CONFIG.parent / sd["authorization"]["credentials_file"]).is_file()
    am = yaml.safe_load(AM_CONFIG.read_text())
    (receiver,) = [r for r in am["receivers"] if r["name"] == "trainguard-supervisor"]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"].endswith("/api/v1/alerts") and hook["send_resolved"] is True
    assert (AM_CONFIG.parent / hook["http_config"]["authorization"]["credentials_file"]).is_file()


def test_promtool_check_rules():
    promtool = require_binary("promtool")
    r = _run(promtool, "check", "rules", *map(str, sorted(RULES_DIR.glob("*.yml"))))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    promtool = require_binary("promtool")
    tests = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
    assert len(tests) >= 3
    r = _run(promtool, "test", "rules", *map(str, tests))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout + r.stderr


def test_amtool_check_config():
    amtool = require_binary("amtool")
    r = _run(amtool, "check-config", str(AM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=recover", "trainguard_kind=loss_spike", "run=r1", "stage=pretrain"], "trainguard-supervisor"),
        (["severity=recover", "trainguard_kind=gpu_fault", "run=r1", "stage=pretrain"], "trainguard-supervisor"),
        (["severity=page", "trainguard_kind=needs_attention", "run=r1"], "pager"),
        (["severity=page", "trainguard_kind=supervisor_down"], "pager"),
        (["severity=warning", "trainguard_kind=low_goodput", "run=r1"], "pager"),
        (["alertname=Watchdog"], "discard"),
    ],
)
def test_alertmanager_routes(labels, receiver):
    amtool = require_binary("amtool")
    r = _run(amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}", *labels)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == receiver


def test_needs_attention_inhibits_the_runs_incident_alerts():
    am = yaml.safe_load(AM_CONFIG.read_text())
    (rule,) = am["inhibit_rules"]
    assert rule["source_matchers"] == ['trainguard_kind="needs_attention"']
    assert rule["equal"] == ["run"]
    for kind in ("loss_spike", "nan", "grad_explosion", "val_divergence", "hang", "straggler", "gpu_fault",
                 "reward_hacking"):
        assert kind in rule["target_matchers"][0]
    assert am["route"]["group_by"] == ["alertname", "run", "stage"]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus on a free port: no scrape targets, the repo's rule files loaded."""
    binary = require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted(RULES_DIR.glob("*.yml"))],
        "scrape_configs": [],
    }))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or httpx.get(f"{url}/-/ready", timeout=1).status_code == 200,
                 timeout=30, what="Prometheus ready")
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        yield url
    finally:
        stop_process(proc)
        log.close()


def _query(url: str, expr: str) -> dict:
    return httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()


def test_every_dashboard_and_rule_expression_parses(prometheus):
    exprs = [(f"{d} / {t}", render_expr(e, run="r1", stage="pretrain", rate_interval="1m"))
             for d, t, e in iter_dashboard_queries(DASHBOARD_DIR)]
    exprs += [(f"{f} / {n}", e) for f, n, e in iter_rule_exprs(RULES_DIR)]
    assert len(exprs) > 50
    failures = []
    for where, expr in exprs:
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        body = _query(prometheus, expr)
        if body.get("status") != "success":
            failures.append(f"{where}: {body.get('error')}\n  {expr}")
    assert not failures, "\n".join(failures)


def test_a_bad_expression_is_rejected(prometheus):
    # The parse test above is only meaningful if Prometheus rejects bad PromQL.
    assert _query(prometheus, "sum by (run (trainguard_step)")["status"] == "error"


def test_rule_groups_load_and_evaluate_in_prometheus(prometheus):
    expected = {(f, n) for f, n, _ in iter_rule_exprs(RULES_DIR)}

    def evaluated():
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if len(rules) == len(expected) and all(r["health"] == "ok" for r in rules) else None

    rules = wait_for(evaluated, timeout=30, interval=0.2, what="every rule evaluated once with health ok")
    assert {r["name"] for r in rules} == {n for _, n in expected}
