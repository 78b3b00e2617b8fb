"""trainguard: training-run monitoring and recovery for large-model training pipelines.

`trainguard.workers` runs the pipeline stages (Ray actors, torch); `trainguard.service` is the
supervisor (detection, recovery, REST API, CLI). The two are installed from the repository's
top-level `workers/` and `service/` folders (a setuptools package-dir mapping), so that
`trainguard` is the one importable name. The files shipped besides code (dashboards, example
pipelines, Prometheus rules, Alertmanager config) are found through `trainguard.resources`.
"""
__version__ = "0.1.0"
