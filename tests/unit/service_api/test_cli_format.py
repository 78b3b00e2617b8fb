"""CLI helpers that need no server: tables and the mixture syntax."""
from __future__ import annotations

import argparse

import pytest

from trainguard.service.cli import build_parser, format_table, parse_mixture


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


def test_rollback_options_show_their_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rollback", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--skip, --no-skip" in text and "(default: skip)" in text
    assert "(default: the recovery policy's backoff, 0.5)" in text
    a = build_parser().parse_args(["rollback", "run-0123456789ab"])
    assert (a.skip, a.lr_multiplier, a.checkpoint) == (True, None, None)
    a = build_parser().parse_args(["rollback", "run-0123456789ab", "--no-skip", "--lr-multiplier", "0.25"])
    assert (a.skip, a.lr_multiplier) == (False, 0.25)
    for value in ("0", "1.5", "-1", "half"):  # outside (0, 1]: a usage error
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["rollback", "run-0123456789ab", "--lr-multiplier", value])
        assert e.value.code == 2 and "argument --lr-multiplier" in capsys.readouterr().err


def test_the_lr_default_shown_is_the_policys():
    from trainguard.service.cli import POLICY_LR_BACKOFF
    from trainguard.service.domain.policy import RecoveryConfig

    assert POLICY_LR_BACKOFF == RecoveryConfig().lr_backoff


def test_serve_refuses_development_tokens_on_a_reachable_address(monkeypatch, capsys):
    import uvicorn

    from trainguard.service.cli import main
    from trainguard.service.config import DEV_TOKENS

    for k in [k for k in __import__("os").environ if k.startswith("TRAINGUARD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served with development tokens"))
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trainguard: error: refusing to serve: ") and "'0.0.0.0'" in err
    assert not any(token in err for token in DEV_TOKENS.values())
