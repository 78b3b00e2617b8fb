"""APScheduler 3.x jobs, started and stopped in FastAPI's lifespan (or by the embedded demo).

Each job calls one controller function; a failure is logged and the job backs off
(its next runs are skipped for a while) instead of dying or flooding the log.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)

__all__ = ["build_scheduler", "guarded"]


def guarded(name: str, fn: Callable[[], object], *, max_backoff: float = 30.0) -> Callable[[], None]:
    """Wrap a job so an exception is logged once per failure streak and backs off exponentially."""
    state = {"failures": 0, "resume_at": 0.0}

    def job() -> None:
        now = time.monotonic()
        if now < state["resume_at"]:
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - background jobs survive their own failures
            state["failures"] += 1
            delay = min(max_backoff, 0.5 * 2 ** state["failures"])
            state["resume_at"] = now + delay
            log.exception("job %s failed (%d in a row); backing off %.1fs", name, state["failures"], delay)
        else:
            state["failures"] = 0

    return job


def build_scheduler(controller, settings) -> BackgroundScheduler:
    # A cycle that outlasts its interval is coalesced on purpose (max_instances=1); APScheduler
    # would log a warning for every skipped run.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    sched = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5})
    sched.add_job(guarded("watch", controller.watch_once), "interval", seconds=settings.effective_watch_interval(),
                  id="watch")
    sched.add_job(guarded("checkpoints", controller.checkpoints_once), "interval", seconds=1.0, id="checkpoints")
    sched.add_job(guarded("goodput", controller.goodput_once), "interval", seconds=2.0, id="goodput")
    return sched
