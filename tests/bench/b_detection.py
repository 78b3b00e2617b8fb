"""detection_latency: from the injected loss spike's onset to the recorded incident.

Onset: the end of the first corrupted step (the moment the signal exists), from rank
0's per-step log. Recorded: the incident row's `detected_at`. Steps: how many more
steps the workers completed between the two. Baseline: one scrape interval (the
watch interval of the embedded path, 0.5 s; Prometheus' scrape interval, 1 s) —
a ratio of 1 means "found within one scrape of being observable".

Two rows:
- `detection_latency`: the embedded path (the supervisor scrapes /history + /metrics).
- `detection_latency_prometheus`: a real `prometheus` binary on a free port scraping the
  workers every 1 s, targets from the supervisor's /api/v1/sd (http_sd_configs), the
  supervisor reading PromQL (`PrometheusSource`). Its spike comes later (batch 200) and
  lasts 30 steps (~4 s), not 4: see PROMETHEUS_SPIKE_STEPS for why a short, early spike is
  invisible on this path.
  Full size only (the smoke run skips it: starting Prometheus plus a second supervised run
  does not fit the smoke budget).
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import httpx

from tests.bench.core import Context, Measurement, benchmark, free_port, log, step_records, wait_until
from tests.bench.shared import SMOKE_SPIKE, SupervisedRun, smoke_run, supervised_run, ts
from tests.support import stop_process
from tests.bench.workload import pipeline, size_for

SPIKE_FAMILY = ("loss_spike", "divergence", "nan", "grad_explosion")
# The Prometheus path sees one sample of the loss gauge per 1 s scrape: a 4-step (0.5 s) spike
# falls between scrapes, and the watch does not turn the guard's trainguard_anomalies_total
# increases into a spike finding. The spike detector also needs `min_history` (16) healthy
# samples before it scores anything and `persistence` (2) samples over threshold: on this
# path those are scrapes, not steps. So that path gets a spike ~25 s into the run (after 16+
# scrapes) lasting 30 steps (~4 s, several scrapes).
PROMETHEUS_SPIKE_STEPS = 30
PROMETHEUS_AT, PROMETHEUS_STEPS = 200, 300


def detection_figures(run: SupervisedRun, at: int) -> tuple[float, int]:
    recs = step_records(run.log())
    onset = next((r for r in recs if int(r.get("batch_index", -1)) == at), None)
    if onset is None:
        raise RuntimeError(f"no step trained batch {at}")
    incs = sorted((i for i in run.incidents if i.kind in SPIKE_FAMILY), key=lambda i: i.id)
    if not incs:
        raise RuntimeError(f"no spike incident recorded (incidents: {[i.kind for i in run.incidents]})")
    found = ts(incs[0].detected_at)
    later = [int(r["step"]) for r in recs if onset["time"] <= r["time"] <= found]
    steps = (max(later) - int(onset["step"])) if later else 0
    return found - onset["time"], steps


def _spec(at: int, steps: int, duration: int = 4):
    # paced to ~0.13 s/step so a 1 s scrape sees the run as a real one would (several steps per scrape)
    return pipeline(name="detect", size=size_for(False), steps=steps, world_size=1, every=10, step_delay=0.1,
                    faults=[{"kind": "loss_spike", "at_step": at, "duration": duration}])


class _Server:
    """The supervisor's REST API (uvicorn, in a thread) over a running Controller."""

    def __init__(self, ctl, port: int) -> None:
        import uvicorn

        from trainguard.service.api import create_app

        app = create_app(ctl.settings, ctl, engine=ctl.engine)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                   lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 30, what="the supervisor API to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _prometheus_run(ctx: Context, at: int, steps: int) -> SupervisedRun:
    from trainguard.service.db import crud
    from tests.bench.shared import controller

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no prometheus binary on PATH")
    d = ctx.sub("detect-prometheus")
    api_port, prom_port = free_port(), free_port()
    from trainguard.service.config import DEV_TOKENS

    (d / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: trainguard
    honor_labels: true
    scrape_interval: 1s
    scrape_timeout: 900ms
    http_sd_configs:
      - url: http://127.0.0.1:{api_port}/api/v1/sd
        refresh_interval: 1s
        authorization: {{type: Bearer, credentials: {DEV_TOKENS['viewer_token']}}}
""")
    prom = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "prometheus.log", "wb"))
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{prom_port}/-/ready", timeout=1).status_code == 200, 60,
                   interval=0.2, what="prometheus to be ready")
        state = d / "state"
        with controller(state, prometheus_url=f"http://127.0.0.1:{prom_port}", port=api_port,
                        prometheus_scrape_interval=1.0) as ctl, \
                _Server(ctl, api_port):
            t0 = time.time()
            run_id = ctl.submit(_spec(at, steps, PROMETHEUS_SPIKE_STEPS), actor="bench")
            st = wait_until(lambda: (s := _state(ctl, run_id)) in ("completed", "failed", "stopped", "needs_attention")
                            and s, 600, interval=0.2, what="the run to end")
            with ctl.session() as s:
                incs = crud.list_incidents(s, run_id=run_id)
            return SupervisedRun.read(state, run_id, st, t0, time.time(), incs, 1.0)
    finally:
        stop_process(prom)


def _state(ctl, run_id: str) -> str:
    from trainguard.service.db import crud

    with ctl.session() as s:
        return crud.get_run(s, run_id=run_id).state


@benchmark("detection_latency", reps=2, smoke_reps=1, uses_ray=True)
def detection_latency(ctx: Context) -> dict[str, Measurement]:
    """Onset of an injected loss spike -> incident recorded (embedded scrape path; Prometheus path)."""
    out: dict[str, Measurement] = {}
    if ctx.smoke:
        run = smoke_run(ctx)
        at = SMOKE_SPIKE
    else:
        at, steps = 60, 100
        run = supervised_run(ctx, "detect-embedded", _spec(at, steps))
    secs, steps_ = detection_figures(run, at)
    log(f"  embedded: {secs:.3f}s, {steps_} steps after the onset")
    out["detection_latency"] = Measurement(secs, run.watch_interval, "s", "one watch/scrape interval (embedded, 0.5 s)",
                                           extra={"steps": steps_})
    if not ctx.smoke:
        try:
            prun = _prometheus_run(ctx, PROMETHEUS_AT, PROMETHEUS_STEPS)
            psecs, psteps = detection_figures(prun, PROMETHEUS_AT)
            log(f"  prometheus: {psecs:.3f}s, {psteps} steps after the onset")
            out["detection_latency_prometheus"] = Measurement(psecs, 1.0, "s", "one Prometheus scrape interval (1 s)",
                                                              extra={"steps": psteps})
        except Exception as e:  # noqa: BLE001 - the embedded row still stands; say why this one is missing
            log(f"  prometheus path failed: {e!r}")
    return out
