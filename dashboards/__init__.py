"""Grafana dashboards (JSON), shipped as package data: `trainguard.resources.dashboards_dir()`."""
