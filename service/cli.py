"""`trainguard`: the command line. Everything but `serve`, `demo`, `analyze` and
`dashboards` talks to a running supervisor over its REST API.

Server and token: --url / --token, else TRAINGUARD_URL / TRAINGUARD_TOKEN, else
http://<TRAINGUARD_HOST>:<TRAINGUARD_PORT> and the configured operator token.
Output: aligned tables for people, `--json` for scripts. An API error is one
line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["main", "build_parser", "format_table", "parse_mixture", "ApiClient", "CliError"]

API = "/api/v1"
TERMINAL = ("completed", "failed", "stopped")
EXIT_OK, EXIT_ERROR, EXIT_NEEDS_ATTENTION = 0, 1, 3


class CliError(Exception):
    """Printed as one line on stderr; exit status 1."""


# --- HTTP ------------------------------------------------------------------------------------


class ApiClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None) -> Any:
        try:
            r = self._http.request(method, API + path, json=json_body, params=params)
        except httpx.ConnectError:
            raise CliError(f"cannot reach the supervisor at {self.url} (is `trainguard serve` running? --url?)") from None
        except httpx.HTTPError as e:
            raise CliError(f"request to {self.url} failed: {e}") from None
        if r.is_success:
            return r.json() if r.content else None
        raise CliError(f"{r.status_code} {r.reason_phrase}: {_error_detail(r)}")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json_body=body)


def _error_detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        return r.text.strip()[:500] or "(no body)"
    if isinstance(detail, list):  # FastAPI's default validation shape
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
    return str(detail)


# --- output ----------------------------------------------------------------------------------

Column = tuple[str, Callable[[dict], Any]]


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Left-aligned text columns, right-aligned numbers, two spaces apart."""
    header = [name for name, _ in columns]
    raw = [[get(row) for _, get in columns] for row in rows]
    cells = [[_cell(v) for v in r] for r in raw]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [bool(raw) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in raw)
               for i in range(len(header))]

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])


def _time(v: str | None) -> str | None:
    return v[:19].replace("T", " ") if v else v


RUN_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("NAME", lambda r: r["name"]),
    ("STATE", lambda r: r["state"]),
    ("STAGE", lambda r: r.get("current_stage")),
    ("LR_MULT", lambda r: r.get("lr_multiplier")),
    ("GOODPUT", lambda r: r.get("goodput")),
    ("UPDATED", lambda r: _time(r.get("updated_at"))),
]
STAGE_COLUMNS: list[Column] = [
    ("#", lambda r: r["index"]),
    ("STAGE", lambda r: r["name"]),
    ("KIND", lambda r: r["kind"]),
    ("STATE", lambda r: r["state"]),
    ("STEP", lambda r: r["step"]),
    ("STEPS", lambda r: r["steps"]),
    ("FIRST_LOSS", lambda r: r.get("first_loss")),
    ("FINAL_LOSS", lambda r: r.get("final_loss")),
    ("RESTARTS", lambda r: r.get("restarts")),
]
CHECKPOINT_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("STAGE", lambda r: r["stage_name"]),
    ("STEP", lambda r: r["step"]),
    ("CURSOR", lambda r: r["batch_cursor"]),
    ("VERIFIED", lambda r: r["verified"]),
    ("HEALTHY", lambda r: r["healthy"]),
    ("TAGS", lambda r: ",".join(r.get("tags") or []) or None),
    ("BAD_REASON", lambda r: r.get("bad_reason")),
    ("PATH", lambda r: r["path"]),
]
INCIDENT_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("STAGE", lambda r: r.get("stage_name")),
    ("KIND", lambda r: r["kind"]),
    ("SOURCE", lambda r: r["source"]),
    ("ONSET", lambda r: r.get("onset_step")),
    ("DETECTED", lambda r: r.get("detected_at_step")),
    ("ACTION", lambda r: r.get("action")),
    ("ROLLBACK_TO", lambda r: r.get("rollback_to_step")),
    ("SKIP", lambda r: r.get("skip") or None),
    ("LR_MULT", lambda r: r.get("lr_multiplier")),
    ("ATTEMPT", lambda r: r.get("attempt")),
    ("OUTCOME", lambda r: r["outcome"]),
    ("RECOVERY_S", lambda r: r.get("recovery_seconds")),
]
EVENT_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("AT", lambda r: _time(r["at"])),
    ("ACTOR", lambda r: r["actor"]),
    ("KIND", lambda r: r["kind"]),
    ("RESULT", lambda r: r.get("result")),
    ("DETAIL", lambda r: r.get("detail") or None),
]


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else render(data))
    return EXIT_OK


def _render_run(run: dict) -> str:
    head = [
        ("run", run["id"]),
        ("name", run["name"]),
        ("state", run["state"]),
        ("stage", run.get("current_stage") or "-"),
        ("lr multiplier", _cell(run.get("lr_multiplier"))),
        ("goodput", _cell(run.get("goodput"))),
        ("created", _time(run.get("created_at"))),
        ("updated", _time(run.get("updated_at"))),
    ]
    if run.get("error"):
        head.append(("error", run["error"]))
    width = max(len(k) for k, _ in head)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in head)
    if run.get("stages"):
        text += "\n\n" + format_table(run["stages"], STAGE_COLUMNS)
    return text


# --- commands --------------------------------------------------------------------------------


def parse_mixture(text: str) -> dict[str, float]:
    """"curated=0.9,web=0.1" -> {"curated": 0.9, "web": 0.1} (the server checks the values)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected SOURCE=WEIGHT[,SOURCE=WEIGHT...], got {part.strip()!r}")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name.strip()!r} is not a number: {weight!r}") from None
    return out


def _progress_line(run: dict) -> str:
    stage = next((s for s in run.get("stages", []) if s["name"] == run.get("current_stage")), None)
    where = f"  {stage['name']} step {stage['step']}/{stage['steps']}" if stage else ""
    return f"{run['id']}  {run['state']}{where}"


def _wait(client: ApiClient, run_id: str, *, until: Sequence[str], interval: float, timeout: float | None) -> dict:
    """Poll the run, printing progress to stderr when it changes; return the final run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        run = client.get(f"/runs/{run_id}")
        line = _progress_line(run)
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if run["state"] in until:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(f"gave up waiting after {timeout}s: run {run_id} is {run['state']}")
        time.sleep(interval)


def _wait_exit(run: dict) -> int:
    if run["state"] == "needs_attention":
        print(f"run {run['id']} needs attention (see `trainguard incidents {run['id']}`)", file=sys.stderr)
        return EXIT_NEEDS_ATTENTION
    return EXIT_ERROR if run["state"] == "failed" else EXIT_OK


def cmd_submit(args: argparse.Namespace, client: ApiClient) -> int:
    try:
        text = sys.stdin.read() if args.pipeline == "-" else Path(args.pipeline).read_text()
    except OSError as e:
        raise CliError(f"cannot read {args.pipeline}: {e.strerror}") from None
    run = client.post("/runs", {"yaml": text})
    if not args.wait:
        return _emit(args, run, lambda r: f"submitted {r['id']} ({r['name']})")
    print(f"submitted {run['id']} ({run['name']})", file=sys.stderr)
    run = _wait(client, run["id"], until=(*TERMINAL, "needs_attention"), interval=args.interval, timeout=args.timeout)
    _emit(args, run, _render_run)
    return _wait_exit(run)


def cmd_runs(args: argparse.Namespace, client: ApiClient) -> int:
    page = client.get("/runs", limit=args.limit, offset=args.offset, state=args.state)
    return _emit(args, page, lambda p: format_table(p["data"], RUN_COLUMNS))


def cmd_status(args: argparse.Namespace, client: ApiClient) -> int:
    return _emit(args, client.get(f"/runs/{args.run}"), _render_run)


def _control(action: str) -> Callable[[argparse.Namespace, ApiClient], int]:
    def cmd(args: argparse.Namespace, client: ApiClient) -> int:
        run = client.post(f"/runs/{args.run}/{action}")
        if action == "stop" and getattr(args, "wait", False):
            run = _wait(client, args.run, until=TERMINAL, interval=args.interval, timeout=args.timeout)
        return _emit(args, run, lambda r: f"{action}: {r['id']} is {r['state']}")

    return cmd


def cmd_anneal(args: argparse.Namespace, client: ApiClient) -> int:
    body = {"steps": args.steps, "final_lr": args.final_lr, "schedule": args.schedule, "mixture": args.mixture}
    run = client.post(f"/runs/{args.run}/anneal", body)
    return _emit(args, run, lambda r: f"anneal sent to {r['id']}: {args.steps} steps to lr {args.final_lr} ({args.schedule})")


def cmd_rollback(args: argparse.Namespace, client: ApiClient) -> int:
    body = {"checkpoint_id": args.checkpoint} if args.checkpoint is not None else None
    res = client.post(f"/runs/{args.run}/rollback", body)
    return _emit(
        args, res, lambda r: f"rollback of {r['run_id']}: incident {_cell(r.get('incident_id'))}, to step {_cell(r.get('target_step'))}"
    )


def _listing(path: str, columns: list[Column]) -> Callable[[argparse.Namespace, ApiClient], int]:
    def cmd(args: argparse.Namespace, client: ApiClient) -> int:
        page = client.get(f"/runs/{args.run}/{path}")
        return _emit(args, page, lambda p: format_table(p["data"], columns))

    return cmd


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import build_app  # the wiring with the real controller and scheduler
    from service.config import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    settings = Settings(**overrides)  # the supervisor advertises this address in /sd
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return EXIT_OK


def cmd_dashboards(args: argparse.Namespace) -> int:
    from service.adapters import grafana  # grafana-client (~0.5 s to import) only when asked for

    if args.dir is None:
        args.dir = grafana.DASHBOARD_DIR
    return grafana.run_dashboards(args)


# --- parser ----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: the options work before or after the subcommand without one overwriting the other.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=argparse.SUPPRESS, help="supervisor URL (env TRAINGUARD_URL)")
    p.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (env TRAINGUARD_TOKEN)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return p


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="poll until the run ends, printing progress on stderr")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="trainguard", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable, help: str, *, run: bool = False, local: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[] if local else [common])
        if run:
            p.add_argument("run", metavar="RUN", help="run id (run-<12 hex>)")
        p.set_defaults(func=func, local=local)
        return p

    p = add("serve", cmd_serve, "run the supervisor (REST API, watch, recovery)", local=True)
    p.add_argument("--host", default=None, help="default: TRAINGUARD_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: TRAINGUARD_PORT or 8700")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = add("submit", cmd_submit, "submit a pipeline YAML ('-' reads stdin)")
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    _wait_options(p)

    p = add("runs", cmd_runs, "list runs, newest first")
    p.add_argument("--state", default=None, help="only runs in this state")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)

    add("status", cmd_status, "a run and its stages", run=True)
    add("pause", _control("pause"), "pause a run at the next step boundary", run=True)
    add("resume", _control("resume"), "resume a paused run", run=True)
    p = add("stop", _control("stop"), "stop a run", run=True)
    _wait_options(p)

    p = add("anneal", cmd_anneal, "anneal the running stage (LR decay, optionally a new data mixture)", run=True)
    p.add_argument("--steps", type=int, required=True, help="steps the anneal lasts")
    p.add_argument("--final-lr", type=float, required=True, help="learning rate at the end")
    p.add_argument("--schedule", choices=["linear", "cosine", "exponential"], default="linear")
    p.add_argument("--mixture", type=parse_mixture, default=None, help="e.g. curated=0.9,web=0.1")

    p = add("rollback", cmd_rollback, "roll back to a checkpoint (default: the newest good one)", run=True)
    p.add_argument("--checkpoint", type=int, default=None, metavar="ID", help="checkpoint id (see `checkpoints RUN`)")

    add("incidents", _listing("incidents", INCIDENT_COLUMNS), "a run's incidents and what recovery did", run=True)
    add("checkpoints", _listing("checkpoints", CHECKPOINT_COLUMNS), "a run's checkpoints", run=True)
    add("events", _listing("events", EVENT_COLUMNS), "a run's audit log", run=True)

    _add_demo(sub)
    _add_analyze(sub)
    _add_dashboards(sub)
    return parser


def _add_dashboards(sub: Any) -> None:
    # Mirrors service.adapters.grafana.add_dashboards_parser (same dests) without importing grafana-client.
    p = sub.add_parser("dashboards", help="Grafana dashboards")
    dsub = p.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)
    push = dsub.add_parser("push", help="create or overwrite the dashboards on a Grafana server")
    push.add_argument("--url", default=os.environ.get("TRAINGUARD_GRAFANA_URL"),
                      help="Grafana base URL (default: $TRAINGUARD_GRAFANA_URL)")
    push.add_argument("--token", default=os.environ.get("TRAINGUARD_GRAFANA_TOKEN"),
                      help="service-account token with the Editor role (default: $TRAINGUARD_GRAFANA_TOKEN)")
    push.add_argument("--dir", type=Path, default=None, help="dashboard JSON folder (default: dashboards/)")
    push.add_argument("--folder-uid", default=None, help="Grafana folder uid (default: the General folder)")
    p.set_defaults(func=cmd_dashboards, local=True)


def _add_demo(sub: Any) -> None:
    try:
        from service.demo import add_demo_parser, run_demo
    except ImportError as e:  # the demo pulls in Ray and torch lazily; a broken install still gets the rest
        p = sub.add_parser("demo", help=f"(unavailable: {e})")
        p.set_defaults(func=lambda _a, err=e: _unavailable("demo", err), local=True)  # `e` dies with the block
        return
    add_demo_parser(sub)
    sub.choices["demo"].set_defaults(func=run_demo, local=True)


def _add_analyze(sub: Any) -> None:
    try:
        from service.analyze import add_analyze_parser, run_analyze
    except ImportError as e:
        p = sub.add_parser("analyze", help=f"(unavailable: {e})")
        p.set_defaults(func=lambda _a, err=e: _unavailable("analyze", err), local=True)
        return
    add_analyze_parser(sub)
    sub.choices["analyze"].set_defaults(func=run_analyze, local=True)


def _unavailable(what: str, e: Exception) -> int:
    raise CliError(f"`trainguard {what}` is not available: {e}")


def _connection(args: argparse.Namespace) -> tuple[str, str | None]:
    url = getattr(args, "url", None) or os.environ.get("TRAINGUARD_URL")
    token = getattr(args, "token", None) or os.environ.get("TRAINGUARD_TOKEN")
    if url and token:
        return url, token
    try:  # same machine as the server: its settings know the address and the operator token
        from service.config import Settings

        s = Settings()
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        return url or f"http://{host}:{s.port}", token or s.operator_token.get_secret_value()
    except ValueError:
        return url or "http://127.0.0.1:8700", token


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        if args.local:
            return int(args.func(args) or 0)
        url, token = _connection(args)
        client = ApiClient(url, token)
        try:
            return args.func(args, client)
        finally:
            client.close()
    except CliError as e:
        print(f"trainguard: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `trainguard ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
