"""Stand-ins for what the supervisor's parts talk to, so they run here without Ray: a worker
group and a metrics source that follow a script (both named as fakes), a restarter that
records requests, and real checkpoint folders with their recorded hashes. The store is real
(SQLite in a temporary folder, with the migrations applied)."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.service.adapters.metrics import Snapshot, Target
from trainguard.service.db import init_db, make_engine
from trainguard.service.supervisor.ledger import Ledger
from trainguard.workers.contract import CheckpointRef, CheckpointReport, ControlKind


def ledger_in(tmp_path: Path) -> Ledger:
    return Ledger(init_db(make_engine(f"sqlite:///{tmp_path / 'store.db'}")))


def tiny_spec(steps: int = 100) -> Any:
    from tests.bench.workload import pipeline

    return pipeline(name="unit", size="tiny", steps=steps, world_size=1)


def new_run(ledger: Ledger, *, steps: int = 100) -> str:
    """A run of one tiny pretrain stage, in the store (state pending)."""
    spec = tiny_spec(steps)
    return ledger.create_run(name=spec.name, spec_json=spec.model_dump_json(), actor="test")


def _digest(b: bytes, algo: str = "blake3") -> dict[str, Any]:
    """A file's recorded entry: BLAKE3 as written now, or sha256 as checkpoints written before it."""
    from trainguard.workers.runtime.checkpoint import file_digest

    return file_digest(b) if algo == "blake3" else {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}


def checkpoint_folder(root: Path, step: int, *, healthy: bool = True, batch_cursor: int | None = None,
                      lr_multiplier: float = 1.0, digest: str = "blake3") -> CheckpointReport:
    """A checkpoint on disk (manifest + one weights file) and the report rank 0 would make of it
    (`digest="sha256"`: as a worker from before BLAKE3 reported it)."""
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    weights = f"weights of step {step}".encode()
    manifest = json.dumps({"step": step, "healthy": healthy}).encode()
    (folder / "model.pt").write_bytes(weights)
    (folder / "manifest.json").write_bytes(manifest)
    ref = CheckpointRef(str(folder), {"manifest.json": _digest(manifest, digest), "model.pt": _digest(weights, digest)})
    return CheckpointReport(seq=step, ref=ref, step=step, batch_cursor=step if batch_cursor is None else batch_cursor,
                            healthy=healthy, metrics={"train_loss": 2.0, "lr_multiplier": lr_multiplier}, tags=[])


class FakeWorkerGroup:
    """Stands in for trainguard.workers.group.WorkerGroup: its polls follow `script` (the last
    status repeats), controls are recorded, `records` are the per-step records its one rank
    exposes to the FakeSource."""

    _next_port = 1

    def __init__(self, script: list[dict[str, Any]], records: list[dict[str, Any]] | None = None,
                 **started_with: Any) -> None:
        self.script = list(script)
        self.records = list(records or [])
        self.started_with = started_with
        self.controls: list[tuple[ControlKind, dict[str, Any]]] = []
        self.closed = False
        self.port = FakeWorkerGroup._next_port
        FakeWorkerGroup._next_port += 1

    def endpoints(self, timeout: float = 0) -> list[dict[str, Any]]:
        return [{"rank": 0, "host": "fake", "port": self.port}]

    def poll(self, timeout: float = 0) -> dict[str, Any]:
        status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return {"ranks": [], "failed_rank": None, "error": None, "checkpoints": [], **status}

    def control(self, kind: ControlKind, payload: dict[str, Any] | None = None, timeout: float = 10.0) -> int:
        self.controls.append((kind, dict(payload or {})))
        return len(self.controls)

    def checkpoint_reports(self, timeout: float = 0) -> list[CheckpointReport]:
        return []

    def shutdown(self) -> None:
        self.closed = True


@dataclass
class FakeSource:
    """A MetricsSource over FakeWorkerGroups: each fetch hands out a group's records once."""

    groups: dict[int, FakeWorkerGroup] = field(default_factory=dict)  # port -> group
    forgotten: list[Target] = field(default_factory=list)

    def fetch(self, targets: list[Target]) -> dict[Target, Snapshot]:
        out = {}
        for t in targets:
            g = self.groups.get(t.port)
            recs, g.records = (g.records, []) if g else ([], [])
            out[t] = Snapshot(reachable=True, records=recs, step=recs[-1]["step"] if recs else None,
                              last_step_time=recs[-1]["time"] if recs else None)
        return out

    def forget(self, target: Target) -> None:
        self.forgotten.append(target)

    def close(self) -> None:
        pass


@dataclass
class RecordingRestarter:
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)

    def request_restart(self, run_id: str, *, checkpoint: str | None, incident: int) -> bool:
        self.requests.append((run_id, checkpoint, incident))
        return True


def steps(first: int, last: int, *, loss: float = 2.0, t0: float | None = None, **extra: Any) -> list[dict[str, Any]]:
    """Rank 0's per-step records, one per step, 1 ms apart, ending about now (no hang in sight)."""
    t0 = time.time() - 0.001 * last if t0 is None else t0
    return [{"step": s, "loss": loss, "grad_norm": 1.0, "batch_index": s - 1, "step_seconds": 0.1,
             "time": t0 + 0.001 * s, **extra} for s in range(first, last + 1)]
