"""Settings come from the environment: no TRAINGUARD_* variable of the caller leaks into a test."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("TRAINGUARD_"):
            monkeypatch.delenv(k)
