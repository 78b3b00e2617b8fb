"""Goodput: productive step time / wall time since a run was submitted, less the time an
operator kept it paused.

Productive: the step time of rank 0's steps that still count (steps replayed after a rollback
or restart count once). Lost: start-up, evaluation, checkpoint stalls, detection and recovery,
replayed steps, and time in needs_attention (docs/operations.md).
"""
from __future__ import annotations

import threading
import time

from trainguard.service.domain.state import RunState

__all__ = ["GoodputClock"]


class GoodputClock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._ended: dict[str, float] = {}
        self._paused_since: dict[str, float] = {}
        self._paused_total: dict[str, float] = {}
        self._done: dict[str, float] = {}  # run -> productive seconds of its finished stages

    def started(self, run_id: str) -> None:
        """The run's driver started (first submission, or adopted after a supervisor restart)."""
        with self._lock:
            self._started.setdefault(run_id, time.time())
            self._ended.pop(run_id, None)

    def ended(self, run_id: str) -> None:
        with self._lock:
            self._ended[run_id] = time.time()

    def stage_finished(self, run_id: str, productive_seconds: float) -> None:
        with self._lock:
            self._done[run_id] = self._done.get(run_id, 0.0) + productive_seconds

    def state_changed(self, run_id: str, state: RunState) -> None:
        """An operator's pause is not lost work (needs_attention is): paused time is taken out."""
        now = time.time()
        with self._lock:
            if state == RunState.PAUSED:
                self._paused_since.setdefault(run_id, now)
            elif run_id in self._paused_since:
                self._paused_total[run_id] = self._paused_total.get(run_id, 0.0) + now - self._paused_since.pop(run_id)

    def ratio(self, run_id: str, running_stage_seconds: float = 0.0) -> float | None:
        """None before the run started (or before any wall time passed)."""
        with self._lock:
            t0 = self._started.get(run_id)
            if t0 is None:
                return None
            useful = self._done.get(run_id, 0.0) + running_stage_seconds
            end = self._ended.get(run_id, time.time())
            wall = end - t0 - self._paused_total.get(run_id, 0.0)
            if run_id in self._paused_since:
                wall -= end - self._paused_since[run_id]
        return min(1.0, useful / wall) if wall > 0 else None
