"""Every PromQL expression the deployment ships: dashboard panels and rule files.

The tests use this inventory to prove that each expression parses (against a real
Prometheus) and names only metrics of the worker/supervisor contract; the e2e test
runs each one against a live pipeline with the dashboard variables substituted
(`render_expr`). `prometheus_rule_manifest` turns the rule files into the
prometheus-operator `PrometheusRule` in deploy/k8s/ (run this module to print it).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DASHBOARD_DIR",
    "RULES_DIR",
    "iter_dashboard_queries",
    "iter_dashboard_variables",
    "iter_rule_exprs",
    "recording_rule_names",
    "render_expr",
    "metric_names",
    "prometheus_rule_manifest",
]

from trainguard.resources import dashboards_dir, rules_dir

DASHBOARD_DIR = dashboards_dir()
RULES_DIR = rules_dir()


def _panels(panels: list[dict[str, Any]]):
    for panel in panels:
        yield panel
        # Collapsed rows keep their panels nested.
        yield from _panels(panel.get("panels") or [])


def iter_dashboard_queries(dashboard_dir: str | Path = DASHBOARD_DIR) -> list[tuple[str, str, str]]:
    """(dashboard file stem, panel title, expr) for every Prometheus target of every panel.

    Expressions are returned as written, with Grafana variables (`$run`, `$stage`,
    `$__rate_interval`) in place; see `render_expr`.
    """
    out: list[tuple[str, str, str]] = []
    for path in sorted(Path(dashboard_dir).glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels") or []):
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append((path.stem, panel.get("title", ""), target["expr"]))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


def iter_dashboard_variables(dashboard_dir: str | Path = DASHBOARD_DIR) -> list[tuple[str, str, str, str]]:
    """(dashboard file stem, variable name, selector, label) for every `label_values(selector, label)`
    query variable (Grafana's Prometheus variable syntax); the selector may be "" (all series)."""
    out: list[tuple[str, str, str, str]] = []
    for path in sorted(Path(dashboard_dir).glob("*.json")):
        dashboard = json.loads(path.read_text())
        for var in (dashboard.get("templating") or {}).get("list") or []:
            if var.get("type") != "query":
                continue
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or var.get("definition", ""))
            m = _LABEL_VALUES.match(text)
            if m is None:
                raise ValueError(f"{path.name}: variable {var.get('name')!r}: not a label_values() query: {text!r}")
            out.append((path.stem, var["name"], m.group("selector") or "", m.group("label")))
    return out


def _rule_files(rules_dir: str | Path) -> list[Path]:
    return sorted(Path(rules_dir).glob("*.yml")) + sorted(Path(rules_dir).glob("*.yaml"))


def iter_rule_exprs(rules_dir: str | Path = RULES_DIR) -> list[tuple[str, str, str]]:
    """(rule file name, rule name -- the `record` or `alert` value, expr) for every rule."""
    out: list[tuple[str, str, str]] = []
    for path in _rule_files(rules_dir):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                out.append((path.name, rule.get("record") or rule.get("alert"), rule["expr"].strip()))
    return out


def recording_rule_names(rules_dir: str | Path = RULES_DIR) -> set[str]:
    names: set[str] = set()
    for path in _rule_files(rules_dir):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups") or []:
            names.update(r["record"] for r in group.get("rules") or [] if "record" in r)
    return names


def render_expr(expr: str, *, run: str, stage: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    """Substitute the Grafana variables the dashboards use with concrete values.

    `stage` lands inside `stage=~"$stage"`, so a regex (".*") works as well as a name.
    """
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace("${run}", run)
        .replace("$run", run)
        .replace("${stage}", stage)
        .replace("$stage", stage)
    )


# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_DURATION = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_NUMBER_SUFFIX = re.compile(r"\b\d+(?:\.\d*)?(?:e[+-]?\d+)?\b", re.IGNORECASE)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a lexical scan, enough for our own rules).

    Strips strings, label matchers, range/subquery brackets and grouping clauses,
    then keeps identifiers that are not followed by `(` (functions, aggregations)
    and are not PromQL keywords. Also finds `{__name__="..."}` selectors.
    """
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)
    s = _DURATION.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    s = _NUMBER_SUFFIX.sub(" ", s)
    for name in _IDENT.findall(s):
        if name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def prometheus_rule_manifest(
    rules_dir: str | Path = RULES_DIR, *, name: str = "trainguard", namespace: str = "trainguard"
) -> dict[str, Any]:
    """The prometheus-operator PrometheusRule carrying every group of `rules_dir`, in file order."""
    groups: list[dict[str, Any]] = []
    for path in _rule_files(rules_dir):
        groups.extend((yaml.safe_load(path.read_text()) or {}).get("groups") or [])
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": name,
            "namespace": namespace,
            # The default ruleSelector of kube-prometheus-stack matches its release label.
            "labels": {"app.kubernetes.io/part-of": "trainguard", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, as in the rule files."""


_BlockDumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def _main(argv: list[str]) -> int:
    if argv[:1] != ["prometheusrule"]:
        print("usage: python -m trainguard.service.adapters.promql_inventory prometheusrule > deploy/k8s/prometheusrule.yaml",
              file=sys.stderr)
        return 2
    sys.stdout.write("# Generated from deploy/prometheus/rules/*.yml by\n"
                     "#   python -m trainguard.service.adapters.promql_inventory prometheusrule\n"
                     "# Do not edit: change the rule files and regenerate "
                     "(tests/integration/deploy checks they agree).\n")
    yaml.dump(prometheus_rule_manifest(), sys.stdout, Dumper=_BlockDumper, sort_keys=False, width=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
