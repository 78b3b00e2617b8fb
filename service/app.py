"""Wiring: settings → controller → scheduler → FastAPI app (what `trainguard serve` runs)."""
from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from typing import Any, Iterator

from fastapi import FastAPI


def build_app(settings=None, controller=None) -> FastAPI:
    from trainguard.service.api import create_app
    from trainguard.service.config import Settings
    from trainguard.service.controller import Controller
    from trainguard.service.scheduler import build_scheduler

    settings = settings or Settings()
    controller = controller or Controller(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        controller.start()
        sched = build_scheduler(controller, settings)
        sched.start()
        try:
            yield
        finally:
            sched.shutdown(wait=False)
            controller.shutdown()

    app = create_app(settings, controller, engine=controller.engine, lifespan=lifespan)
    return app


@contextmanager
def embedded_supervisor(settings: Any) -> Iterator[Any]:
    """A started Controller with its scheduler jobs, in this process (demo, tests, benchmarks);
    stopped on exit."""
    from trainguard.service.controller import Controller
    from trainguard.service.scheduler import build_scheduler

    controller = Controller(settings)
    controller.start()
    sched = build_scheduler(controller, settings)
    sched.start()
    try:
        yield controller
    finally:
        sched.shutdown(wait=False)
        controller.shutdown()
