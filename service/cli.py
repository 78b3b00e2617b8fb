"""`trainguard`: the command line. Everything but `serve`, `demo`, `analyze`, `export`,
`tokenize` and `dashboards` talks to a running supervisor over its REST API.

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
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import httpx

from trainguard.service.cli_format import (
    CHECKPOINT_COLUMNS,
    EVENT_COLUMNS,
    INCIDENT_COLUMNS,
    PROPOSAL_COLUMNS,
    RUN_COLUMNS,
    Column,
    cell,
    current_stage,
    format_table,
    page_table,
    progress_line,
    render_run,
)
from trainguard.service.domain.policy import RecoveryConfig
from trainguard.service.domain.state import TERMINAL_RUN_STATES, RunState

__all__ = ["main", "build_parser", "format_table", "parse_mixture", "ApiClient", "CliError"]

API = "/api/v1"
EXIT_OK, EXIT_ERROR, EXIT_NEEDS_ATTENTION = 0, 1, 3
POLICY_LR_BACKOFF = RecoveryConfig().lr_backoff  # what `rollback` without --lr-multiplier applies
PROGRESS_REPEAT_S = 30.0  # --wait repeats an unchanged progress line this often: a stall stays visible
# `submit --wait` returns once the run is over or needs an operator (`stop --wait`: once it is over)
SETTLED_RUN_STATES = TERMINAL_RUN_STATES | {RunState.NEEDS_ATTENTION}


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


# --- commands --------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else render(data))
    return EXIT_OK


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


def _progress_key(run: dict) -> tuple:
    # What counts as progress; the age of the last step alone does not.
    stage = current_stage(run) or {}
    return run["state"], stage.get("name"), stage.get("step"), stage.get("last_loss")


def _wait(client: ApiClient, run_id: str, *, until: Collection[str], interval: float, timeout: float | None) -> dict:
    """Poll the run, printing progress to stderr when it changes (and every PROGRESS_REPEAT_S
    while it does not); return the final run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last, printed_at = None, 0.0
    while True:
        run = client.get(f"/runs/{run_id}")
        key = _progress_key(run)
        if key != last or time.monotonic() - printed_at >= PROGRESS_REPEAT_S:
            print(progress_line(run), file=sys.stderr, flush=True)
            last, printed_at = key, time.monotonic()
        if run["state"] in until:
            return run
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(f"gave up waiting after {timeout}s: run {run_id} is {run['state']}")
        time.sleep(interval)


def _wait_exit(run: dict) -> int:
    if run["state"] == RunState.NEEDS_ATTENTION:
        print(f"run {run['id']} needs attention (see `trainguard incidents {run['id']}`)", file=sys.stderr)
        return EXIT_NEEDS_ATTENTION
    return EXIT_ERROR if run["state"] == RunState.FAILED else EXIT_OK


def cmd_submit(args: argparse.Namespace, client: ApiClient) -> int:
    try:
        text = sys.stdin.read() if args.pipeline == "-" else Path(args.pipeline).read_text()
    except OSError as e:
        raise CliError(f"cannot read {args.pipeline}: {e.strerror}") from None
    body = {"yaml": text}
    if args.recovery_mode:
        body["recovery_mode"] = args.recovery_mode
    run = client.post("/runs", body)
    if not args.wait:
        return _emit(args, run, lambda r: f"submitted {r['id']} ({r['name']})")
    print(f"submitted {run['id']} ({run['name']})", file=sys.stderr)
    run = _wait(client, run["id"], until=SETTLED_RUN_STATES, interval=args.interval, timeout=args.timeout)
    _emit(args, run, render_run)
    return _wait_exit(run)


def cmd_runs(args: argparse.Namespace, client: ApiClient) -> int:
    page = client.get("/runs", limit=args.limit, offset=args.offset, state=args.state)
    return _emit(args, page, lambda p: format_table(p["data"], RUN_COLUMNS))


def cmd_status(args: argparse.Namespace, client: ApiClient) -> int:
    return _emit(args, client.get(f"/runs/{args.run}"), render_run)


def _control(action: str) -> Callable[[argparse.Namespace, ApiClient], int]:
    def cmd(args: argparse.Namespace, client: ApiClient) -> int:
        run = client.post(f"/runs/{args.run}/{action}")
        if action == "stop" and getattr(args, "wait", False):
            run = _wait(client, args.run, until=TERMINAL_RUN_STATES, interval=args.interval, timeout=args.timeout)
        return _emit(args, run, lambda r: f"{action}: {r['id']} is {r['state']}")

    return cmd


def cmd_anneal(args: argparse.Namespace, client: ApiClient) -> int:
    body = {"steps": args.steps, "final_lr": args.final_lr, "schedule": args.schedule, "mixture": args.mixture}
    run = client.post(f"/runs/{args.run}/anneal", body)
    return _emit(args, run, lambda r: f"anneal sent to {r['id']}: {args.steps} steps to lr {args.final_lr} ({args.schedule})")


def cmd_rollback(args: argparse.Namespace, client: ApiClient) -> int:
    body = {"checkpoint_id": args.checkpoint, "skip": args.skip, "lr_multiplier": args.lr_multiplier}
    res = client.post(f"/runs/{args.run}/rollback", {k: v for k, v in body.items() if v is not None})
    return _emit(
        args, res, lambda r: f"rollback of {r['run_id']}: incident {cell(r.get('incident_id'))}, to step {cell(r.get('target_step'))}"
    )


def _decide(verb: str) -> Callable[[argparse.Namespace, ApiClient], int]:
    """`approve RUN PROPOSAL` / `reject RUN PROPOSAL` (verb: approve | reject)."""

    def cmd(args: argparse.Namespace, client: ApiClient) -> int:
        body = {"note": args.note} if args.note else None
        prop = client.post(f"/runs/{args.run}/proposals/{args.proposal}/{verb}", body)
        return _emit(args, prop, lambda p: f"proposal {p['id']} of {p['run_id']} {p['state']}: {p['action']}"
                                           + (f" to step {p['checkpoint_step']}" if p.get("checkpoint_step") is not None
                                              else ""))

    return cmd


def _proposal_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a proposal id: {text!r} (see `trainguard proposals RUN`)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"proposal ids start at 1, got {text}")
    return value


def _lr_multiplier(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _listing(path: str, columns: list[Column]) -> Callable[[argparse.Namespace, ApiClient], int]:
    def cmd(args: argparse.Namespace, client: ApiClient) -> int:
        params = {"limit": args.limit, "offset": args.offset}
        if getattr(args, "all", False):
            params["all"] = "true"
        page = client.get(f"/runs/{args.run}/{path}", **params)
        return _emit(args, page, lambda p: page_table(p, columns, args.offset))

    return cmd


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from trainguard.service.app import build_app  # the wiring with the real controller and scheduler
    from trainguard.service.config import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    try:
        settings = Settings(**overrides)  # the supervisor advertises this address in /sd
    except ValueError as e:  # pydantic's ValidationError; it shows no input values (no tokens)
        raise CliError(f"refusing to serve: {_settings_problems(e)}") from None
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return EXIT_OK


def _settings_problems(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    problems = []
    for err in errors(include_url=False, include_input=False):
        where = "TRAINGUARD_" + "_".join(map(str, err["loc"])).upper() + ": " if err["loc"] else ""
        problems.append(where + err["msg"].removeprefix("Value error, "))
    return "; ".join(problems)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from trainguard.service.adapters import grafana  # grafana-client (~0.5 s to import) only when asked for

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


def _page_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=100, help="rows per page, at most 1000 (default: %(default)s)")
    p.add_argument("--offset", type=int, default=0, help="rows to skip (default: %(default)s)")


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
    p.add_argument("--recovery-mode", choices=["auto", "approve", "observe"], default=None,
                   help="auto: recover on its own; approve: propose and wait for `trainguard approve`; "
                        "observe: propose, never act (default: the server's TRAINGUARD_RECOVERY_MODE)")
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
    p.add_argument("--checkpoint", type=int, default=None, metavar="ID",
                   help="checkpoint id (see `checkpoints RUN`; default: the newest good one)")
    p.add_argument("--skip", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the batches trained on since the checkpoint, never training on them again "
                        "(default: skip)")
    p.add_argument("--lr-multiplier", type=_lr_multiplier, default=None, metavar="X",
                   help="multiply the learning rate by X, 0 < X <= 1 "
                        f"(default: the recovery policy's backoff, {POLICY_LR_BACKOFF})")

    p = add("incidents", _listing("incidents", INCIDENT_COLUMNS), "a run's incidents and what recovery did", run=True)
    _page_options(p)
    p = add("checkpoints", _listing("checkpoints", CHECKPOINT_COLUMNS),
            "a run's live checkpoints (--all: also the ones retention deleted)", run=True)
    p.add_argument("--all", action="store_true", help="include deleted checkpoints (the history)")
    _page_options(p)
    p = add("events", _listing("events", EVENT_COLUMNS), "a run's audit log, oldest first", run=True)
    _page_options(p)
    p = add("proposals", _listing("proposals", PROPOSAL_COLUMNS),
            "recoveries a run in approve or observe mode proposed, and what became of them", run=True)
    _page_options(p)
    for verb, text in (("approve", "carry out a recovery proposal exactly as proposed"),
                       ("reject", "decline a recovery proposal (nothing changes)")):
        p = add(verb, _decide(verb), text, run=True)
        p.add_argument("proposal", metavar="PROPOSAL", type=_proposal_id, help="proposal id (see `proposals RUN`)")
        p.add_argument("--note", default=None, help="why (kept with the proposal and in the event log)")

    _add_demo(sub)
    _add_analyze(sub)
    _add_export(sub)
    _add_dashboards(sub)
    _add_tokenize(sub)
    return parser


def _add_tokenize(sub: Any) -> None:
    from trainguard.workers.shards import add_tokenize_parser, run_tokenize  # numpy; tokenizers load on use

    def run(args: argparse.Namespace) -> int:
        try:
            return run_tokenize(args)
        except (OSError, ValueError) as e:
            raise CliError(str(e)) from None

    add_tokenize_parser(sub).set_defaults(func=run, local=True)


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
        from trainguard.service.demo import add_demo_parser, run_demo
    except ImportError as e:  # the demo pulls in Ray and torch lazily; a broken install still gets the rest
        p = sub.add_parser("demo", help=f"(unavailable: {e})")
        p.set_defaults(func=lambda _a, err=e: _unavailable("demo", err), local=True)  # `e` dies with the block
        return
    add_demo_parser(sub)
    sub.choices["demo"].set_defaults(func=run_demo, local=True)


def _add_analyze(sub: Any) -> None:
    try:
        from trainguard.service.analyze import add_analyze_parser, run_analyze
    except ImportError as e:
        p = sub.add_parser("analyze", help=f"(unavailable: {e})")
        p.set_defaults(func=lambda _a, err=e: _unavailable("analyze", err), local=True)
        return
    add_analyze_parser(sub)
    sub.choices["analyze"].set_defaults(func=run_analyze, local=True)


def _add_export(sub: Any) -> None:
    from trainguard.service.export import add_export_parser, run_export  # light: transformers loads on use

    add_export_parser(sub)
    sub.choices["export"].set_defaults(func=run_export, local=True)


def _unavailable(what: str, e: Exception) -> int:
    raise CliError(f"`trainguard {what}` is not available: {e}")


def _connection(args: argparse.Namespace) -> tuple[str, str | None]:
    url = getattr(args, "url", None) or os.environ.get("TRAINGUARD_URL")
    token = getattr(args, "token", None) or os.environ.get("TRAINGUARD_TOKEN")
    if url and token:
        return url, token
    try:  # same machine as the server: its settings know the address and the operator token
        from trainguard.service.config import Settings

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
