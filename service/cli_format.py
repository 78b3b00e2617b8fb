"""How the `trainguard` command line shows things to people: aligned tables, a run's
summary, the one-line progress of `--wait` (`--json` prints the API's objects as they are)."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from trainguard.service.domain.state import StageState

__all__ = [
    "Column",
    "Row",
    "RUN_COLUMNS",
    "STAGE_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "INCIDENT_COLUMNS",
    "EVENT_COLUMNS",
    "PROPOSAL_COLUMNS",
    "cell",
    "format_table",
    "short_time",
    "age",
    "checkpoint_status",
    "render_run",
    "current_stage",
    "progress_line",
    "page_table",
]

Row = dict[str, Any]  # one object of the API, as JSON decodes it
Column = tuple[str, Callable[[Row], Any]]


def cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def format_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    """Left-aligned text columns, right-aligned numbers, two spaces apart."""
    header = [name for name, _ in columns]
    raw = [[get(row) for _, get in columns] for row in rows]
    cells = [[cell(v) for v in r] for r in raw]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [bool(raw) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in raw)
               for i in range(len(header))]

    def line(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header)] + [line(r) for r in cells])


def short_time(v: str | None) -> str | None:
    return v[:19].replace("T", " ") if v else v


def age(v: str | None, now: datetime | None = None) -> str | None:
    """"2026-01-01T00:00:00Z" -> "12s ago" (from this machine's clock)."""
    if not v:
        return None
    try:
        at = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return v
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    seconds = max(0, int(((now or datetime.now(timezone.utc)) - at).total_seconds()))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s ago"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m ago"


def checkpoint_status(r: Row) -> str:
    # Deleted by retention is not unhealthy: it is gone, and was fine.
    if r.get("deleted_at"):
        return "deleted"
    if r.get("bad_reason") or not r.get("healthy", True):
        return "bad"
    return "good" if r.get("verified") else "unverified"


RUN_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("NAME", lambda r: r["name"]),
    ("STATE", lambda r: r["state"]),
    ("STAGE", lambda r: r.get("current_stage")),
    ("LR_MULT", lambda r: r.get("lr_multiplier")),
    ("GOODPUT", lambda r: r.get("goodput")),
    ("UPDATED", lambda r: short_time(r.get("updated_at"))),
]
STAGE_COLUMNS: list[Column] = [
    ("#", lambda r: r["index"]),
    ("STAGE", lambda r: r["name"]),
    ("KIND", lambda r: r["kind"]),
    ("STATE", lambda r: r["state"]),
    ("STEP", lambda r: r["step"]),
    ("STEPS", lambda r: r["steps"]),
    ("LOSS", lambda r: r.get("last_loss")),
    ("LAST_STEP", lambda r: age(r.get("last_step_at")) if r.get("state") == StageState.RUNNING else None),
    ("FIRST_LOSS", lambda r: r.get("first_loss")),
    ("FINAL_LOSS", lambda r: r.get("final_loss")),
    ("RESTARTS", lambda r: r.get("restarts")),
]
CHECKPOINT_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("STAGE", lambda r: r["stage_name"]),
    ("STEP", lambda r: r["step"]),
    ("CURSOR", lambda r: r["batch_cursor"]),
    ("STATUS", checkpoint_status),
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
    ("AT", lambda r: short_time(r["at"])),
    ("ACTOR", lambda r: r["actor"]),
    ("KIND", lambda r: r["kind"]),
    ("RESULT", lambda r: r.get("result")),
    ("DETAIL", lambda r: r.get("detail") or None),
]


PROPOSAL_COLUMNS: list[Column] = [
    ("ID", lambda r: r["id"]),
    ("STAGE", lambda r: r.get("stage_name")),
    ("KIND", lambda r: r["kind"]),
    ("MODE", lambda r: r["mode"]),
    ("ACTION", lambda r: r["action"]),
    ("TO_STEP", lambda r: r.get("checkpoint_step")),
    ("SKIP", lambda r: r.get("skip") or None),
    ("LR_MULT", lambda r: r.get("lr_target")),
    ("INCIDENT", lambda r: r.get("incident_id")),
    ("STATE", lambda r: r["state"]),
    ("PROPOSED", lambda r: short_time(r.get("proposed_at"))),
    ("BY", lambda r: r.get("decided_by")),
]


def render_run(run: Row) -> str:
    """A run's fields, one per line, then its stages as a table."""
    head = [
        ("run", run["id"]),
        ("name", run["name"]),
        ("state", run["state"]),
        ("stage", run.get("current_stage") or "-"),
        ("lr multiplier", cell(run.get("lr_multiplier"))),
        ("goodput", cell(run.get("goodput"))),
        ("created", short_time(run.get("created_at"))),
        ("updated", short_time(run.get("updated_at"))),
    ]
    if run.get("recovery_mode") not in (None, "auto"):
        head.append(("recovery mode", run["recovery_mode"]))
    if run.get("error"):
        head.append(("error", run["error"]))
    width = max(len(k) for k, _ in head)
    text = "\n".join(f"{k.ljust(width)}  {v}" for k, v in head)
    if run.get("stages"):
        text += "\n\n" + format_table(run["stages"], STAGE_COLUMNS)
    return text


def current_stage(run: Row) -> Row | None:
    return next((s for s in run.get("stages", []) if s["name"] == run.get("current_stage")), None)


def progress_line(run: Row) -> str:
    """"run-x  running  pretrain step 40/100  loss 2.31  last step 2s ago" (live while a stage runs)."""
    stage = current_stage(run)
    where = f"  {stage['name']} step {stage['step']}/{stage['steps']}" if stage else ""
    if stage and stage.get("last_loss") is not None:
        where += f"  loss {cell(stage['last_loss'])}"
    if stage and stage.get("state") == StageState.RUNNING and stage.get("last_step_at"):
        where += f"  last step {age(stage['last_step_at'])}"
    return f"{run['id']}  {run['state']}{where}"


def page_table(page: Row, columns: list[Column], offset: int) -> str:
    """A page of a listing as a table, with a note when rows were left out."""
    text = format_table(page["data"], columns)
    shown = len(page["data"])
    if offset or shown < page["count"]:
        text += f"\n({shown} of {page['count']} from offset {offset}; see --limit/--offset)"
    return text
