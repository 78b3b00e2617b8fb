"""Compose, Kubernetes and Grafana provisioning files; Prometheus service discovery.

There is no Docker engine or Kubernetes cluster here: the compose and k8s files are
checked for structure and agreement with the Prometheus/Alertmanager configs only.
The service-discovery test is real: promtool runs the repo's http_sd_configs and
relabelling against an HTTP server that answers like the supervisor's GET /api/v1/sd.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.support import REPO_ROOT
from trainguard.service.adapters.promql_inventory import RULES_DIR, prometheus_rule_manifest
from tests.conftest import require_binary

pytestmark = pytest.mark.integration

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_k8s_manifests_parse_and_name_their_objects():
    kinds = set()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name
            kinds.add(doc["kind"])
    assert {"RayCluster", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ScrapeConfig",
            "Secret"} <= kinds


def test_prometheusrule_groups_equal_the_rule_files():
    (rule,) = _docs(K8S / "prometheusrule.yaml")
    on_disk = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        on_disk.extend(yaml.safe_load(path.read_text())["groups"])
    assert rule["spec"]["groups"] == on_disk
    assert rule == prometheus_rule_manifest(RULES_DIR)


def test_supervisor_deployment_reads_secrets_and_postgres_url():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(K8S / "supervisor.yaml")}
    (container,) = docs[("Deployment", "trainguard-supervisor")]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRAINGUARD_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "trainguard-database"
    for name in ("TRAINGUARD_VIEWER_TOKEN", "TRAINGUARD_OPERATOR_TOKEN", "TRAINGUARD_WEBHOOK_TOKEN"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "trainguard-tokens"
    assert env["TRAINGUARD_ENVIRONMENT"]["value"] == "production"
    port = container["ports"][0]["containerPort"]
    assert docs[("Service", "trainguard-supervisor")]["spec"]["ports"][0]["port"] == port
    secret_keys = {k for d in _docs(K8S / "secrets.example.yaml") for k in d["stringData"]}
    assert {"viewer-token", "operator-token", "webhook-token", "url"} <= secret_keys


def test_compose_services_and_mounts_match_the_configs():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"supervisor", "ray-head", "prometheus", "alertmanager", "grafana", "postgres"} <= set(services)
    grafana_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["grafana"]["volumes"] if v.startswith("."))
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana_mounts["../dashboards"] == "/var/lib/grafana/dashboards"
    for svc, cfg in (("prometheus", "prometheus.yml"), ("alertmanager", "alertmanager.yml")):
        mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services[svc]["volumes"] if v.startswith("."))
        # The configs name ../secrets/<token> relative to themselves: mount both side by side.
        cfg_dir = mounts[f"./{svc}"]
        assert mounts["./secrets"] == cfg_dir.rsplit("/", 1)[0] + "/secrets"
        assert any(a == f"--config.file={cfg_dir}/{cfg}" for a in services[svc]["command"])
    assert services["supervisor"]["environment"]["TRAINGUARD_DATABASE_URL"].startswith("postgresql")
    assert "8700:8700" in services["supervisor"]["ports"]


def test_grafana_provisioning():
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "trainguard.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


class _FakeSD(BaseHTTPRequestHandler):
    """Answers like the supervisor's GET /api/v1/sd (service/controller.py sd_targets)."""

    token = ""
    groups = [
        {"targets": ["0.0.0.0:8700"], "labels": {"job": "trainguard-supervisor", "component": "supervisor"}},
        {"targets": ["10.0.0.5:41234"],
         "labels": {"job": "trainguard-workers", "run": "run-1", "stage": "pretrain", "rank": "0"}},
    ]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        ok = self.path == "/api/v1/sd" and self.headers.get("Authorization") == f"Bearer {self.token}"
        body = json.dumps(self.groups if ok else {"detail": "unauthorized"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)


def test_http_sd_with_bearer_token_and_relabelling(tmp_path):
    promtool = require_binary("promtool")
    # A copy of deploy/ with the same layout, so ../secrets/ resolves the same way.
    shutil.copytree(DEPLOY / "prometheus", tmp_path / "prometheus")
    shutil.copytree(DEPLOY / "secrets", tmp_path / "secrets")
    _FakeSD.token = (DEPLOY / "secrets" / "prometheus-token").read_text().strip()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeSD)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "prometheus" / "prometheus.yml"
        config.write_text(config.read_text().replace(
            "http://supervisor:8700", f"http://127.0.0.1:{httpd.server_address[1]}"))
        r = subprocess.run([promtool, "check", "service-discovery", "--timeout=5s", str(config), "trainguard"],
                           capture_output=True, text=True, timeout=60)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r.returncode == 0, r.stdout + r.stderr
    targets = {t["labels"]["job"]: t["labels"] for t in json.loads(r.stdout)}
    assert targets["trainguard-supervisor"]["__address__"] == "supervisor:8700"  # 0.0.0.0 rewritten
    worker = targets["trainguard-workers"]
    assert (worker["run"], worker["stage"], worker["rank"], worker["__address__"]) == \
        ("run-1", "pretrain", "0", "10.0.0.5:41234")
    assert worker["__scrape_interval__"] == "5s"
