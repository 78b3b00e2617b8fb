"""api_latency: p50/p99 of the REST API under 50 concurrent clients, against /healthz under the same load.

Server: the real FastAPI app (`service.api.create_app`) under uvicorn in its own process,
on a real SQLite store holding 1,000 runs. The control call (`POST /api/v1/runs/{id}/pause`)
goes to `FakeControllerForBench`, which accepts the call and does nothing: the real
controller would need Ray workers for 1,000 runs. So the control figure is the API's own
cost (auth, run lookup, the call, the run detail it answers with), not the workers'.

Client: 50 concurrent asyncio clients (httpx, one connection each), each sending its
requests back to back; `/healthz`, then `GET /api/v1/runs` (first page, 100 of the 1,000,
with the total count), then the control call, every phase the same number of requests.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.bench.core import Context, Measurement, benchmark, free_port, log, percentile, wait_until
from tests.support import stop_process

CLIENTS = 50
VIEWER, OPERATOR = "dev-viewer-token", "dev-operator-token"


class FakeControllerForBench:
    """The ControllerPort, minus the workers: control calls are accepted and do nothing."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def submit(self, spec, *, actor):
        from sqlmodel import Session

        from trainguard.service.db import crud

        with Session(self.engine) as s:
            return crud.create_run(s, name=spec.name, spec_json=spec.model_dump_json(), actor=actor).id

    def pause(self, run_id, *, actor):
        return None

    def resume(self, run_id, *, actor):
        return None

    def stop(self, run_id, *, actor):
        return None

    def anneal(self, run_id, *, steps, final_lr, schedule, mixture, actor):
        return None

    def rollback(self, run_id, *, checkpoint_id, actor, skip=True, lr_multiplier=None):
        return {"incident": 1, "action": "rollback", "rollback_to_step": 0}

    def handle_alerts(self, payload, *, actor):
        return {"created": 0, "merged": 0, "resolved": 0, "ignored": 0}

    def sd_targets(self):
        return []

    def metrics_text(self):
        return b""

    def ready(self):
        return True


def serve(db_url: str, state_dir: str, port: int) -> None:
    """Entry point of the server process."""
    import uvicorn

    from trainguard.service.api import create_app
    from trainguard.service.config import Settings
    from trainguard.service.db import init_db, make_engine

    settings = Settings(state_dir=Path(state_dir), environment="development", database_url=db_url)
    engine = init_db(make_engine(db_url))
    app = create_app(settings, FakeControllerForBench(engine), engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _populate(db_url: str, n: int) -> list[str]:
    from sqlmodel import Session

    from trainguard.service.db import crud, init_db, make_engine
    from tests.bench.workload import pipeline

    engine = init_db(make_engine(db_url))
    spec = pipeline(name="api", size="tiny", steps=100, world_size=1).model_dump_json()
    ids = []
    with Session(engine) as s:
        for i in range(n):
            ids.append(crud.create_run(s, name=f"api-{i}", spec_json=spec, actor="bench").id)
    engine.dispose()
    return ids


async def _load(base: str, method: str, paths: list[str], token: str | None, per_client: int) -> list[float]:
    lat: list[float] = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as c:
            for k in range(per_client):
                path = paths[(i * per_client + k) % len(paths)]
                t0 = time.perf_counter()
                r = await c.request(method, path)
                lat.append(time.perf_counter() - t0)
                if r.status_code >= 400:
                    raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return lat


@benchmark("api_latency", reps=2, smoke_reps=1)
def api_latency(ctx: Context) -> dict[str, Measurement]:
    """p50/p99 of GET /api/v1/runs (1,000 runs) and a control call, 50 concurrent clients, vs /healthz."""
    d = ctx.sub("api")
    n_runs = 100 if ctx.smoke else 1000  # smoke: structure only
    per_client = 2 if ctx.smoke else 20
    db_url = f"sqlite:///{d / 'api.db'}"
    ids = _populate(db_url, n_runs)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", f"from tests.bench.b_api import serve; serve({db_url!r}, {str(d)!r}, {port})"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "server.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, 60, interval=0.1,
                   what="the API server")
        health = asyncio.run(_load(base, "GET", ["/healthz"], None, per_client))
        runs = asyncio.run(_load(base, "GET", ["/api/v1/runs"], VIEWER, per_client))
        control = asyncio.run(_load(base, "POST", [f"/api/v1/runs/{r}/pause" for r in ids], OPERATOR, per_client))
    finally:
        stop_process(proc)
    p = lambda xs, q: percentile(xs, q) * 1000  # noqa: E731 - ms
    log(f"  healthz p50 {p(health, .5):.1f} ms p99 {p(health, .99):.1f} ms; runs p50 {p(runs, .5):.1f} "
        f"p99 {p(runs, .99):.1f}; control p50 {p(control, .5):.1f} p99 {p(control, .99):.1f} "
        f"({len(health)} requests per phase)")
    base_name = f"/healthz, same load ({CLIENTS} clients)"
    return {
        "api_latency": Measurement(p(runs, .5), p(health, .5), "ms", base_name + " p50",
                                   extra={"requests": len(runs), "runs_in_store": n_runs}),
        "api_latency_runs_p99": Measurement(p(runs, .99), p(health, .99), "ms", base_name + " p99"),
        "api_latency_control_p50": Measurement(p(control, .5), p(health, .5), "ms",
                                               base_name + " p50; FakeControllerForBench"),
        "api_latency_control_p99": Measurement(p(control, .99), p(health, .99), "ms",
                                               base_name + " p99; FakeControllerForBench"),
    }
