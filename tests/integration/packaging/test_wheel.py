"""trainguard as a user gets it: the wheel, installed non-editable, run from a folder outside the
repository. Ray puts the driver's working directory on the workers' `sys.path`, so a run from
the checkout would hide a module or a data file missing from the wheel.

The wheel goes into a fresh virtual environment that sees the test environment's installed
dependencies (torch, Ray, ...) through a `.pth` line, so nothing is downloaded; the editable
install of trainguard there is not activated (its finder is loaded by a `.pth` *file*, which a
path appended by a `.pth` line does not run), so every `trainguard` import comes from the wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.integration.deploy.fake_grafana import FakeGrafanaServer
from tests.support import REPO_ROOT

pytestmark = pytest.mark.integration

SOURCES = ("pyproject.toml", "README.md", "trainguard", "service", "workers", "dashboards", "examples", "deploy")

PIPELINE = """\
name: wheel-check
seed: 0
model: {n_layer: 1, n_head: 2, d_model: 32, seq_len: 32}
checkpoint: {every: 10, keep_last: 3}
stages:
  - name: pretrain
    kind: pretrain
    steps: 60
    batch_size: 8
    lr: 0.003
    eval_every: 20
    faults:
      - {kind: nan, at_step: 30}
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the wheel installed; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        p = REPO_ROOT / name
        (shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
         if p.is_dir() else shutil.copy2(p, src / name))
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("trainguard-*.whl")
    _check_wheel_contents(wheel)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    (purelib / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    return venv / "bin"


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _check_wheel_contents(wheel: Path) -> None:
    """Every package of the tree and every shipped data file is in the wheel; tests are not."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for top, prefix in (("service", "trainguard/service"), ("workers", "trainguard/workers")):
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            want = f"{prefix}/{init.parent.relative_to(REPO_ROOT / top).as_posix()}/__init__.py".replace("/./", "/")
            assert want in names, f"{want} missing from the wheel (add its package to pyproject.toml)"
    for data in ("trainguard/dashboards/training-runs.json", "trainguard/examples/tiny.yaml",
                 "trainguard/deploy/prometheus/rules/alerts.yml", "trainguard/deploy/alertmanager/alertmanager.yml",
                 "trainguard/service/db/migrations/script.py.mako",
                 "trainguard/service/db/migrations/versions/0002_checkpoint_trust_live_stage.py"):
        assert data in names, f"{data} missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "service/", "workers/"))], "only trainguard/ at the top"


def _env(outside: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINGUARD_", "PYTHONPATH", "RAY_ADDRESS"))}
    env.update(HOME=str(outside), RAY_USAGE_STATS_ENABLED="0", PYTHONHASHSEED="0")
    return env


def test_the_wheel_imports_from_itself_not_the_checkout(installed, tmp_path):
    out = _run([str(installed / "python"), "-c",
                "import trainguard.service.cli as c, trainguard.workers.group as g, trainguard.resources as r;"
                "print(c.__file__); print(g.__file__); print(r.dashboards_dir())"], cwd=tmp_path, env=_env(tmp_path))
    for line in out.split():
        assert str(installed.parent) in line and str(REPO_ROOT) not in line, out


def test_dashboards_push_uses_the_packaged_dashboards(installed, tmp_path):
    with FakeGrafanaServer() as grafana:
        _run([str(installed / "trainguard"), "dashboards", "push", "--url", grafana.url, "--token", grafana.token],
             cwd=tmp_path, env=_env(tmp_path))
        shipped = {json.loads(p.read_text())["uid"] for p in (REPO_ROOT / "dashboards").glob("*.json")}
        assert set(grafana.dashboards) == shipped and not grafana.rejected


def test_an_embedded_run_end_to_end_then_analyze_its_log(installed, tmp_path):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE)
    state = tmp_path / "state"
    out = _run([str(installed / "trainguard"), "demo", "--pipeline", str(pipeline), "--state-dir", str(state),
                "--json", "--quiet", "--timeout", "240"], cwd=tmp_path, env=_env(tmp_path), timeout=300)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["state"] == "completed", summary
    (inc,) = [i for i in summary["incidents"] if i["kind"] == "nan"]
    assert inc["action"] == "rollback" and inc["rollback_to_step"] < 30
    log = state / "runs" / summary["run_id"] / "pretrain" / "metrics-rank0.jsonl"
    found = json.loads(_run([str(installed / "trainguard"), "analyze", str(log), "--json"],
                            cwd=tmp_path, env=_env(tmp_path)))
    assert any(f["kind"] == "nan" for f in found), found
