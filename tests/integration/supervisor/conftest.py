"""Fixtures for supervisor tests."""
from __future__ import annotations

import pytest

from trainguard.service.supervisor.driver import RunDriver


@pytest.fixture
def groups(monkeypatch) -> dict[str, list]:
    """Every worker group each run's driver creates (first start and restarts)."""
    made: dict[str, list] = {}
    real = RunDriver._new_group

    def recording(self, *a, **kw):
        g = real(self, *a, **kw)
        made.setdefault(self.run_id, []).append(g)
        return g

    monkeypatch.setattr(RunDriver, "_new_group", recording)
    return made
