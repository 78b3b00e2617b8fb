"""Dashboard JSON and rule files: structure, and only contract metric names."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.support import REPO_ROOT
from trainguard.service.adapters.promql_inventory import (
    DASHBOARD_DIR,
    RULES_DIR,
    iter_dashboard_queries,
    iter_rule_exprs,
    metric_names,
    recording_rule_names,
    render_expr,
)
from trainguard.workers.contract import MetricName

DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
INCIDENT_KINDS = {"loss_spike", "nan", "grad_explosion", "val_divergence", "hang", "straggler", "gpu_fault",
                  "reward_hacking", "needs_attention", "supervisor_down", "low_goodput", "policy_ratio",
                  "negative_kl", "entropy_collapse", "response_length", "value_loss_explosion", "dpo_collapse"}


def _allowed_names() -> set[str]:
    base = {v for k, v in vars(MetricName).items() if k.isupper() and isinstance(v, str)}
    suffixed = {b + s for b in base for s in ("", "_total", "_bucket", "_sum", "_count")}
    return suffixed | recording_rule_names(RULES_DIR) | {"up"}


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels") or [])
    return out


def test_both_dashboards_exist():
    assert {p.name for p in DASHBOARDS} == {"training-runs.json", "fleet-health.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    d = json.loads(path.read_text())
    assert d["uid"] and len(d["uid"]) <= 40 and d["title"]
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["current"]["value"] == "prometheus"  # the provisioned uid
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(d):
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip() and t["refId"], p["title"]


def test_training_runs_has_run_and_stage_variables_and_uses_them():
    d = json.loads((DASHBOARD_DIR / "training-runs.json").read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["run"]["definition"].startswith("label_values(")
    assert variables["stage"]["definition"].startswith("label_values(")
    assert variables["stage"]["includeAll"] and variables["stage"]["allValue"] == ".*"
    for _, title, expr in iter_dashboard_queries(DASHBOARD_DIR):
        if _ == "training-runs":
            assert '$run"' in expr, f"{title}: {expr} ignores the run variable"


def test_training_runs_covers_the_brief():
    titles = " | ".join(t for d, t, _ in iter_dashboard_queries(DASHBOARD_DIR) if d == "training-runs").lower()
    for needle in ("loss", "gradient norm", "learning rate", "tokens / s", "step time per rank",
                   "tokens per parameter", "checkpoint", "incidents", "rollbacks", "goodput",
                   "reward mean", "kl", "kl coefficient", "preference accuracy", "dpo reward margin"):
        assert needle in titles, needle
    d = json.loads((DASHBOARD_DIR / "training-runs.json").read_text())
    (tpp,) = [p for p in _panels(d) if p["title"].startswith("Tokens per parameter")]
    steps = tpp["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert 20 in [s["value"] for s in steps]  # the Chinchilla line
    assert tpp["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_incident_and_rollback_annotations_by_tag(path):
    anns = json.loads(path.read_text())["annotations"]["list"]
    tagged = {a["name"]: a["target"]["tags"] for a in anns if a.get("target", {}).get("type") == "tags"}
    assert "incident" in tagged["Incidents"] and "rollback" in tagged["Rollbacks"]


def test_every_expression_uses_only_contract_metrics():
    allowed = _allowed_names()
    exprs = iter_dashboard_queries(DASHBOARD_DIR) + iter_rule_exprs(RULES_DIR)
    assert len(exprs) > 50
    for where, name, expr in exprs:
        unknown = metric_names(expr) - allowed
        assert not unknown, f"{where} / {name}: {sorted(unknown)} not in workers.contract.MetricName"
        assert metric_names(expr), f"{where} / {name}: no metric found in {expr!r}"


def test_variable_queries_use_contract_metrics():
    allowed = _allowed_names()
    d = json.loads((DASHBOARD_DIR / "training-runs.json").read_text())
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            metric = re.match(r"label_values\((\w+)", v["definition"]).group(1)
            assert metric in allowed


def test_metric_names_scanner():
    expr = ('sum by (stage, le) (rate(trainguard_step_seconds_bucket{run="$run", stage=~"a|b"}[$__rate_interval]))'
            ' / on (run) group_left trainguard:tokens:rate1m offset 5m > bool 1e3 and up')
    assert metric_names(expr) == {"trainguard_step_seconds_bucket", "trainguard:tokens:rate1m", "up"}


def test_render_expr_substitutes_grafana_variables():
    expr = 'rate(trainguard_tokens_total{run="$run", stage=~"$stage"}[$__rate_interval])'
    assert render_expr(expr, run="r1", stage="sft", rate_interval="30s") == \
        'rate(trainguard_tokens_total{run="r1", stage=~"sft"}[30s])'


def _alerts() -> list[dict]:
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for g in yaml.safe_load(path.read_text())["groups"]:
            out.extend(r for r in g["rules"] if "alert" in r)
    return out


def test_every_alert_has_severity_kind_summary_and_runbook():
    alerts = _alerts()
    assert {a["labels"]["trainguard_kind"] for a in alerts} == INCIDENT_KINDS
    for a in alerts:
        assert a["labels"]["severity"] in {"page", "warning", "recover"}, a["alert"]
        assert a["annotations"]["summary"], a["alert"]
        assert a["annotations"]["runbook_url"] == f"docs/operations.md#{a['alert'].lower()}"


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_runbook_anchors_exist_in_operations_guide():
    anchors = _github_anchors((REPO_ROOT / "docs" / "operations.md").read_text())
    for a in _alerts():
        assert a["annotations"]["runbook_url"].split("#")[1] in anchors, a["alert"]


def test_every_alert_has_a_promtool_test():
    tested = set()
    for path in (REPO_ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test") or []:
                tested.add((t["alertname"], bool(t["exp_alerts"])))
    for a in _alerts():
        assert (a["alert"], True) in tested, f"{a['alert']}: no firing case"
        assert (a["alert"], False) in tested, f"{a['alert']}: no not-firing case"
