"""The supervisor's in-memory view of the stage a run is executing now, and of a recovery in
flight for it. Both live in the run's driver and change only under the run's lock."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trainguard.service.domain.series import RecordBuffer, Sample

__all__ = ["ActiveStage", "PendingRecovery", "BUFFER_STEPS"]

BUFFER_STEPS = 400
"""Per-step records kept per rank: the detectors' windows fit in it with room to spare."""


@dataclass
class PendingRecovery:
    """A recovery decided and not yet seen to take effect.

    A rollback sent to the live group is done when rank 0's steps go back to the checkpoint
    (`target_step` + 1, or any step below `from_step`); a restart when the new group's first
    step arrives (`group_started`)."""

    incident: int
    kind: str
    detected_at: float  # unix time of the decision: recovery time is measured from here
    target_step: int | None  # the checkpoint's step (None: the stage's input)
    checkpoint: str | None = None  # its path
    from_step: int = -1  # rank 0's step when the rollback was sent
    restart: bool = False  # carried out by a new worker group (not a control to the live one)
    group_started: bool = False  # that new group is up: its first step completes the recovery
    start_failures: int = 0  # groups started for it that died or timed out before their first step
    # incidents whose recovery in flight this one replaced -> the unix time each was decided
    replaces: dict[int, float] = field(default_factory=dict)

    def taken_effect(self, step: int) -> bool:
        """Is rank 0's `step` the first one after this recovery was carried out?"""
        if self.restart:
            return self.group_started
        # a scrape-based source may not see target+1 itself, only that the step went back
        return self.target_step is None or step <= self.target_step + 1 or step < self.from_step


@dataclass
class ActiveStage:
    """What the supervisor knows about a running stage: its worker group and metrics endpoints,
    the buffered per-step records of each rank, counters and heartbeats, live progress, the
    step time that counts for goodput, and the recovery in flight. It is the domain's
    `StageSignals` (service/domain/evaluate.py)."""

    run_id: str
    name: str
    kind: str
    index: int
    steps: int
    group: Any = None  # trainguard.workers.group.WorkerGroup (or a fake in unit tests)
    targets: list[Any] = field(default_factory=list)  # adapters.metrics.Target, one per rank
    started_at: float = field(default_factory=time.time)
    # rank -> per-step records, with each metric's samples kept beside them (series.py RecordBuffer)
    records: dict[int, RecordBuffer] = field(default_factory=dict)
    counter_series: dict[tuple[int, str], list[Sample]] = field(default_factory=dict)  # (rank, name) -> changes
    heartbeat: dict[int, float] = field(default_factory=dict)  # rank -> unix time of its last step
    paused_ranks: set[int] = field(default_factory=set)
    last_step: int = -1
    last_step_time: float | None = None  # unix time rank 0 finished `last_step`
    batch_cursor: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    pending: PendingRecovery | None = None
    step_seconds: dict[int, float] = field(default_factory=dict)  # rank 0's step -> seconds: productive time
    handled_until: dict[str, int] = field(default_factory=dict)  # kind -> detected-at step of the last handled episode
    resumed_at: float = 0.0  # unix time of the last operator resume: hang clocks start again there
    live_written: tuple[int, float] = (-1, 0.0)  # (step, when) last written to the stage row
    done: bool = False  # the stage completed: the watch has seen its last step and leaves it
    group_first_step: int | None = None  # the first step the current worker group reported
    held_by_proposal: bool = False  # its group finished while an approve-mode proposal waited
    world_size: int | None = None  # ranks of its current worker group (an elastic stage's may be fewer)
    declared_world_size: int | None = None  # the stage's world_size in the spec
    # rank -> (heartbeat, read at, busy seconds) of its process's latest busy reading, and the
    # time since which it has been idle (workers/runtime/busy.py; the hang rule's second signal)
    busy: dict[int, tuple[float | None, float, float]] = field(default_factory=dict)
    idle_since: dict[int, float] = field(default_factory=dict)
    # what the last evaluation of these buffers found nothing in (evaluate.py `_sample_findings`)
    eval_memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shrunk(self) -> bool:
        """Its group runs with fewer ranks than the stage declares (an elastic restart)."""
        return (self.world_size is not None and self.declared_world_size is not None
                and self.world_size < self.declared_world_size)

    @property
    def ranks(self) -> list[int]:
        return [t.rank for t in self.targets]

    @property
    def idle(self) -> dict[int, float]:
        """Rank -> seconds its worker process has been idle, by its latest reading (ranks idle now)."""
        return {r: self.busy[r][1] - since for r, since in self.idle_since.items() if r in self.busy}

    def observe_busy(self, rank: int, heartbeat: float | None, at: float, busy: float, fraction: float) -> None:
        """A reading of the rank's busy counter at `at` (unix seconds): idle since the previous
        reading when the process was busy for at most `fraction` of the interval between them
        and no step finished meanwhile (the heartbeat did not move)."""
        prev = self.busy.get(rank)
        self.busy[rank] = (heartbeat, at, busy)
        if prev is None or prev[0] != heartbeat or at <= prev[1] or busy - prev[2] > fraction * (at - prev[1]):
            self.idle_since.pop(rank, None)
        else:
            self.idle_since.setdefault(rank, prev[1])

    def series(self, rank: int) -> deque[dict[str, Any]]:
        """The rank's record buffer (a RecordBuffer: its metrics' samples are kept as records
        arrive and leave, a rollback's `pop` included)."""
        buf = self.records.get(rank)
        if buf is None:
            buf = self.records[rank] = RecordBuffer(maxlen=BUFFER_STEPS)
        return buf

    def went_back(self, kept_until: int | None = None) -> None:
        """The workers went back (a rollback applied, a group restarted from a checkpoint): the
        records after `kept_until` are gone from the buffers, and with them the episodes found
        there. Those found in what the buffers keep stay handled — found again on every rollback,
        an old trend would roll the run back further each time (a rollback spiral) — and
        everything after `kept_until` is watched afresh. None: nothing was kept."""
        if kept_until is None:
            self.handled_until.clear()
            return
        for kind, step in list(self.handled_until.items()):
            self.handled_until[kind] = min(step, kept_until)

    def new_group(self, group: Any, targets: list[Any], *, resumed_at_step: int | None = None) -> None:
        """A restarted worker group replaces the old one. The records up to the checkpoint it
        resumes from stay (the detectors need history: a problem right after the resume is
        still a spike against what came before); without a known checkpoint they are dropped."""
        self.group, self.targets = group, targets
        for series in self.records.values():
            while series and (resumed_at_step is None or int(series[-1]["step"]) > resumed_at_step):
                series.pop()
        self.heartbeat.clear()
        self.busy.clear()
        self.idle_since.clear()
        self.counter_series.clear()
        self.group_first_step = None
        self.went_back(resumed_at_step)
        self.started_at = time.time()
        if self.pending is not None:
            self.pending.group_started = True

    def productive_seconds(self) -> float:
        return sum(self.step_seconds.values())
