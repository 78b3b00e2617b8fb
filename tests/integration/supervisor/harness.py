"""Helpers for supervisor tests: a real Controller + scheduler on a temp state dir, tiny pipelines."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import ray
import uvicorn
from ray.exceptions import RayActorError

from trainguard.service.config import Settings
from trainguard.service.controller import Controller
from trainguard.service.db import crud
from trainguard.service.app import embedded_supervisor
from tests.conftest import wait_for
from trainguard.workers.spec import parse_pipeline

TERMINAL = ("completed", "failed", "stopped", "needs_attention")
FINAL_STAGE_STATES = ("completed", "stopped", "failed", "skipped")


def tiny_pipeline(*, name: str = "t", kind: str = "pretrain", steps: int = 120, world_size: int = 1,
                  faults: list[dict] | None = None, every: int = 10, keep_last: int = 6, extra: dict | None = None,
                  seed: int = 7) -> Any:
    stage = {"name": kind, "kind": kind, "steps": steps, "world_size": world_size, "batch_size": 8,
             "lr": 3e-3, "warmup_steps": 5, "eval_every": 40, "eval_batches": 2, "faults": faults or []}
    stage.update(extra or {})
    return parse_pipeline({
        "name": name, "seed": seed,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        "checkpoint": {"every": every, "keep_last": keep_last},
        "stages": [stage],
    })


@contextlib.contextmanager
def running_controller(state_dir: Path, **overrides: Any) -> Iterator[Controller]:
    opts = dict(state_dir=state_dir, environment="development", watch_interval=0.25, hang_timeout=4.0)
    opts.update(overrides)
    with embedded_supervisor(Settings(**opts)) as ctl:
        yield ctl


@contextlib.contextmanager
def api_server(ctl: Controller, port: int) -> Iterator[uvicorn.Server]:
    """The REST API over `ctl`, served by uvicorn in a thread on 127.0.0.1:`port`."""
    from trainguard.service.api import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ctl.settings, ctl), host="127.0.0.1", port=port,
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    wait_for(lambda: server.started, 10, what="uvicorn start")
    try:
        yield server
    finally:
        server.should_exit = True
        th.join(10)


def serve_process(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`trainguard serve` in a process (and session) of its own, configured by `env`, output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "trainguard.service.cli", "serve"], env={**os.environ, **env},
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def reap_detached_actors() -> None:
    """Kill every detached rank actor (and its placement group) a `trainguard serve` on the test
    session's Ray left behind: a test that failed mid-run must not hold the next test's CPUs."""
    from trainguard.workers.group import reap_detached

    reap_detached(keep=())


def ready(client: httpx.Client) -> bool:
    """Whether the server behind `client` answers /readyz with 200 (False while it starts)."""
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def run_state(ctl: Controller, run_id: str) -> str:
    with ctl.session() as s:
        return crud.get_run(s, run_id=run_id).state


def wait_state(ctl: Controller, run_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = run_state(ctl, run_id)
        if st in states:
            return st
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} still {run_state(ctl, run_id)!r} after {timeout}s; wanted {states}\n"
                         f"{_threads_and_incidents(ctl, run_id)}")


def _threads_and_incidents(ctl: Controller, run_id: str) -> str:
    """What a stuck run looks like from inside: every thread's stack, the run's incidents and
    events, the driver's pending recovery (a run stuck once in a full-suite run; see issue 8's note)."""
    import sys
    import traceback

    frames = sys._current_frames()
    stacks = [f"--- thread {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
              for t in threading.enumerate() if t.ident in frames]
    with ctl.session() as s:
        incs = [(i.id, i.kind, i.action, i.outcome, i.rollback_to_step) for i in crud.list_incidents(s, run_id=run_id)]
        events = [(e.kind, e.result) for e in crud.list_events(s, run_id=run_id)]
    d = ctl.drivers.get(run_id)
    pending = d.active.pending if d and d.active else None
    return f"incidents: {incs}\nevents: {events}\npending: {pending}\n" + "\n".join(stacks)


def incidents(ctl: Controller, run_id: str) -> list[Any]:
    with ctl.session() as s:
        return crud.list_incidents(s, run_id=run_id)


def metrics_log(state_dir: Path, run_id: str, stage: str, rank: int = 0) -> list[dict]:
    """The worker's per-step JSONL log (every step it trained, in order, across rollbacks/restarts)."""
    p = state_dir / "runs" / run_id / stage / f"metrics-rank{rank}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def assert_nothing_survives(ctl: Controller, run_id: str, groups: list) -> None:
    wait_for(lambda: run_id not in ctl.drivers, 60, what="the run's driver to end")
    assert not any(t.name == f"driver-{run_id}" and t.is_alive() for t in threading.enumerate())
    assert not [g for g in ctl.sd_targets() if g["labels"].get("run") == run_id]
    with ctl.session() as s:
        stages = crud.list_stages(s, run_id=run_id)
        assert all(st.state in FINAL_STAGE_STATES for st in stages), [(st.name, st.state) for st in stages]
        assert not crud.list_incidents(s, run_id=run_id, open_only=True)
    assert groups, "the run started at least one worker group"
    for g in groups:
        for a in g._actors:
            with pytest.raises(RayActorError):
                ray.get(a.status.remote(), timeout=30)
