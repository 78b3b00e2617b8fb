"""The files trainguard ships besides code, found through `importlib.resources`: an editable
checkout and an installed wheel find them the same way, and nothing depends on the working
directory or on where the repository is."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["dashboards_dir", "examples_dir", "rules_dir", "alertmanager_config", "prometheus_config"]


def _dir(package: str) -> Path:
    ref = files(package)
    if not isinstance(ref, Path):  # a zip import: package data is not plain files there
        raise RuntimeError(f"{package} is not installed as files on disk; install trainguard from a wheel or a checkout")
    return ref


def dashboards_dir() -> Path:
    """The Grafana dashboard JSON files (`dashboards/` in the repository)."""
    return _dir("trainguard.dashboards")


def examples_dir() -> Path:
    """Example pipeline YAML files (`examples/`)."""
    return _dir("trainguard.examples")


def rules_dir() -> Path:
    """Prometheus recording and alerting rules (`deploy/prometheus/rules/`)."""
    return _dir("trainguard.deploy") / "prometheus" / "rules"


def prometheus_config() -> Path:
    return _dir("trainguard.deploy") / "prometheus" / "prometheus.yml"


def alertmanager_config() -> Path:
    return _dir("trainguard.deploy") / "alertmanager" / "alertmanager.yml"
