"""`trainguard demo`: everything embedded — SQLite, local Ray, direct scraping, the REST API —
running the example pipeline through all six stages with injected faults, a live view on
stderr, and a summary at the end (`--json`: one JSON object on stdout)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trainguard.resources import examples_dir

DEFAULT_PIPELINE = examples_dir() / "tiny-faults.yaml"

# which incident kind answers which injected fault
FAULT_TO_INCIDENT = {
    "loss_spike": ("loss_spike", "divergence", "grad_explosion"),
    "nan": ("nan",),
    "worker_crash": ("worker_lost",),
    "hang": ("hang",),
    "slow": ("straggler",),
    "checkpoint_corrupt": ("checkpoint_corrupt",),
    "gpu_xid": ("gpu_fault",),
}


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the embedded demo (supervisor, local Ray, example pipeline with faults)")
    p.add_argument("--pipeline", type=Path, default=DEFAULT_PIPELINE, help="pipeline YAML (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (default: a fresh temp dir)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--port", type=int, default=0, help="REST API port (0: a free port)")
    p.add_argument("--quiet", action="store_true", help="no live view")


def summarize(ctl: Any, run_id: str, spec: Any, wall: float) -> dict:
    from trainguard.service.db import crud

    with ctl.session() as s:
        run = crud.get_run(s, run_id=run_id)
        stages = crud.list_stages(s, run_id=run_id)
        incidents = crud.list_incidents(s, run_id=run_id)
    faults = [{"kind": f.kind.value, "stage": st.name, "step": f.at_step, "rank": f.rank}
              for st in spec.stages for f in st.faults]
    incs = [{
        "id": i.id, "kind": i.kind, "stage": i.stage_name, "onset_step": i.onset_step,
        "detected_at_step": i.detected_at_step, "action": i.action, "rollback_to_step": i.rollback_to_step,
        "recovery_seconds": i.recovery_seconds, "source": i.source, "outcome": i.outcome,
    } for i in incidents]
    for f in faults:
        kinds = FAULT_TO_INCIDENT.get(f["kind"], ())
        match = next((i for i in incs if i["stage"] == f["stage"] and i["kind"] in kinds), None)
        f["matched_incident"] = match["id"] if match else None
    goodput = run.goodput if run.goodput is not None else ctl.goodput_of(run_id)
    return {
        "run_id": run_id,
        "state": run.state,
        "stages": [{"name": st.name, "kind": st.kind, "state": st.state, "steps": st.steps,
                    "first_loss": st.first_loss, "final_loss": st.final_loss} for st in stages],
        "faults_injected": faults,
        "incidents": incs,
        "goodput_ratio": goodput,
        "wall_seconds": round(wall, 1),
    }


def _print_summary(summary: dict, out=sys.stderr) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\nrun {summary['run_id']}: {summary['state']} in {summary['wall_seconds']}s, "
      f"goodput {summary['goodput_ratio'] if summary['goodput_ratio'] is None else round(summary['goodput_ratio'], 3)}")
    p(f"{'stage':<14}{'kind':<14}{'state':<11}{'steps':>6}{'first loss':>12}{'final loss':>12}")
    for st in summary["stages"]:
        fl = "-" if st["first_loss"] is None else f"{st['first_loss']:.3f}"
        ll = "-" if st["final_loss"] is None else f"{st['final_loss']:.3f}"
        p(f"{st['name']:<14}{st['kind']:<14}{st['state']:<11}{st['steps']:>6}{fl:>12}{ll:>12}")
    p(f"\n{'incident':<18}{'stage':<14}{'onset':>6}{'found':>6}  {'action':<16}{'to step':>8}{'recover s':>10}")
    for i in summary["incidents"]:
        rs = "-" if i["recovery_seconds"] is None else f"{i['recovery_seconds']:.2f}"
        to = "-" if i["rollback_to_step"] is None else str(i["rollback_to_step"])
        p(f"{i['kind']:<18}{i['stage']:<14}{i['onset_step']:>6}{i['detected_at_step']:>6}  "
          f"{str(i['action']):<16}{to:>8}{rs:>10}")
    missed = [f for f in summary["faults_injected"] if f["matched_incident"] is None]
    p(f"\nfaults injected: {len(summary['faults_injected'])}, matched by an incident: "
      f"{len(summary['faults_injected']) - len(missed)}")


class LiveView(threading.Thread):
    """Prints stage, step, loss and new incidents on stderr once a second."""

    def __init__(self, ctl: Any, run_id: str, t0: float) -> None:
        super().__init__(daemon=True, name="live-view")
        self.ctl, self.run_id, self.t0 = ctl, run_id, t0
        self.stop = threading.Event()
        self.seen: set[int] = set()

    def run(self) -> None:
        from trainguard.service.db import crud

        while not self.stop.wait(1.0):
            try:
                with self.ctl.session() as s:
                    run = crud.get_run(s, run_id=self.run_id)
                    incs = crud.list_incidents(s, run_id=self.run_id)
                for i in incs:
                    if i.id not in self.seen:
                        self.seen.add(i.id)
                        print(f"  ! incident {i.kind} in {i.stage_name} at step {i.onset_step} "
                              f"-> {i.action or 'deciding'}", file=sys.stderr, flush=True)
                d = self.ctl.drivers.get(self.run_id)
                a = d.active if d else None
                if a is not None:
                    loss = "-" if a.last_loss is None else f"{a.last_loss:.3f}"
                    print(f"[{time.time() - self.t0:6.1f}s] {run.state:<15} stage {a.name:<13} "
                          f"step {max(a.last_step, 0):>4}/{a.steps:<4} loss {loss}", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - the view must never kill the demo
                print(f"  (live view: {e})", file=sys.stderr)


def run_demo(args: argparse.Namespace) -> int:
    from trainguard.service.config import DEV_TOKENS, Settings
    from trainguard.workers.spec import load_pipeline

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = load_pipeline(args.pipeline)
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="trainguard-demo-"))
    settings = Settings(state_dir=state_dir, environment="development", port=args.port or _free_port(),
                        hang_timeout=6.0)
    # a token is never printed: the built-in development one is named as such, a real one is not shown
    dev = settings.operator_token.get_secret_value() == DEV_TOKENS["operator_token"]
    token = f"the development operator token {DEV_TOKENS['operator_token']!r}" if dev else "TRAINGUARD_OPERATOR_TOKEN"
    print(f"trainguard demo: state in {state_dir}, API on http://{settings.host}:{settings.port}/api/v1 "
          f"(operator token: {token})", file=sys.stderr)
    t0 = time.time()
    # Ray (raylet notices, worker output) writes to stdout, both through sys.stdout and to fd 1
    # directly: with --json both point at stderr while the demo runs, so stdout carries the JSON
    # summary first (`... --json | jq` works)
    sys.stdout.flush()
    real_stdout = os.dup(1) if args.json else None
    if real_stdout is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            summary = _run(args, settings, spec, t0)
    finally:
        if real_stdout is not None:
            sys.stdout.flush()
            os.dup2(real_stdout, 1)
            os.close(real_stdout)
    _print_summary(summary)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if summary["state"] == "completed" else 1


def _run(args: argparse.Namespace, settings: Any, spec: Any, t0: float) -> dict:
    from trainguard.service.app import embedded_supervisor

    with embedded_supervisor(settings) as ctl:
        server = _serve(settings, ctl)
        run_id = ctl.submit(spec, actor="demo")
        print(f"submitted run {run_id}: {' -> '.join(s.name for s in spec.stages)}; faults: "
              + ", ".join(f"{f.kind.value}@{s.name}:{f.at_step}" for s in spec.stages for f in s.faults),
              file=sys.stderr)
        view = LiveView(ctl, run_id, t0)
        if not args.quiet:
            view.start()
        try:
            _wait_for_end(ctl, run_id, t0 + args.timeout)
        finally:
            view.stop.set()
            summary = summarize(ctl, run_id, spec, time.time() - t0)
            server.should_exit = True
    return summary


def _wait_for_end(ctl: Any, run_id: str, deadline: float) -> None:
    from trainguard.service.db import crud

    while time.time() < deadline:
        with ctl.session() as s:
            if crud.get_run(s, run_id=run_id).state in ("completed", "failed", "stopped", "needs_attention"):
                return
        time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(settings: Any, ctl: Any):
    """The REST API in a background thread, so the CLI can watch and control the demo run."""
    import uvicorn

    from trainguard.service.api import create_app

    app = create_app(settings, ctl, engine=ctl.engine)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="api").start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainguard demo")
    sub = parser.add_subparsers(dest="cmd")
    add_demo_parser(sub)
    args = parser.parse_args(["demo", *(argv or [])])
    return run_demo(args)
