"""CLI helpers that need no server: tables and the mixture syntax."""
from __future__ import annotations

import argparse

import pytest

from service.cli import build_parser, format_table, parse_mixture


def test_table_aligns_text_left_and_numbers_right():
    rows = [{"id": "run-a", "step": 5, "loss": 2.0, "ok": True}, {"id": "run-bbbb", "step": 1200, "loss": None, "ok": False}]
    cols = [("ID", lambda r: r["id"]), ("STEP", lambda r: r["step"]), ("LOSS", lambda r: r["loss"]), ("OK", lambda r: r["ok"])]
    assert format_table(rows, cols).splitlines() == [
        "ID        STEP  LOSS  OK",
        "run-a        5     2  yes",
        "run-bbbb  1200     -  no",
    ]


def test_empty_table_is_just_the_header():
    assert format_table([], [("ID", lambda r: r["id"])]) == "ID"


def test_mixture_syntax():
    assert parse_mixture("curated=0.9, web=0.1") == {"curated": 0.9, "web": 0.1}
    for bad in ("curated", "=0.3", "web=lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mixture(bad)


def test_every_documented_command_exists():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "submit", "runs", "status", "pause", "resume", "stop", "anneal", "rollback", "incidents",
            "checkpoints", "demo", "analyze", "dashboards"} <= set(sub.choices)


def test_global_options_parse_before_and_after_the_command():
    p = build_parser()
    a = p.parse_args(["--json", "--url", "http://x", "runs"])
    b = p.parse_args(["runs", "--json", "--url", "http://x"])
    assert (a.json, a.url) == (b.json, b.url) == (True, "http://x")
