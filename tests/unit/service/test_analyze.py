"""`trainguard analyze`: logs in CSV / JSONL / TensorBoard replayed through the detectors."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from trainguard.service.analyze import AnalyzeError, add_analyze_parser, analyze_file, load_series, main, run_analyze
from tests.unit.service.curves import healthy_loss, inject_spike

SPIKES = [(800, 5, 4.0), (1600, 3, 3.0)]


def _loss() -> list:
    xs = healthy_loss(11, 2500, sigma=0.05)
    for at, dur, factor in SPIKES:
        xs = inject_spike(xs, at, dur, factor)
    return xs


def _kinds(findings):
    return [(f["kind"], f["onset_step"]) for f in findings]


def write_csv(path: Path, loss_col: str = "loss") -> Path:
    lines = [f"step,{loss_col},grad_norm,lr,val_loss"]
    clean = healthy_loss(11, 2500, sigma=0.0)  # validation: a held-out set, little noise, no spikes
    for s in _loss():
        val = f"{clean[s.step].value * 1.1:.6f}" if s.step % 100 == 0 else ""
        lines.append(f"{s.step},{s.value:.6f},1.0,0.001,{val}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_spikes_reported_once_each(tmp_path):
    findings = analyze_file(write_csv(tmp_path / "log.csv"))
    assert _kinds(findings) == [("loss_spike", 800), ("loss_spike", 1600)]
    f = findings[0]
    assert set(f) == {"kind", "onset_step", "detected_at_step", "evidence"}
    assert f["detected_at_step"] == 801 and f["evidence"]["end_step"] == 804


def test_csv_train_loss_column_is_loss(tmp_path):
    series = load_series(write_csv(tmp_path / "log.csv", loss_col="train_loss"))
    assert {"loss", "grad_norm", "lr", "val_loss"} <= set(series)
    assert len(series["val_loss"]) == 25  # sparse column: only the rows that have it


def test_jsonl_worker_history_with_nan_and_anomaly(tmp_path):
    path = tmp_path / "history.jsonl"
    with path.open("w") as f:
        for s in _loss():
            rec = {"step": s.step, "batch_index": s.step, "time": 1.0 * s.step, "loss": s.value, "grad_norm": 0.5,
                   "lr": 1e-3, "spike_score": 0.1, "anomaly": None, "step_seconds": 0.01}
            if s.step == 2000:
                rec.update(loss=math.nan, anomaly="nonfinite_loss")
            if s.step == 2200:
                rec.update(anomaly="nonfinite_grad")  # seen only through the guard's counter
            f.write(json.dumps(rec) + "\n")
    assert _kinds(analyze_file(path)) == [("loss_spike", 800), ("loss_spike", 1600), ("nan", 2000), ("nan", 2200)]


class SummaryWriter:
    """Scalars into a TensorBoard event file with tensorboard's own writer (no torch import)."""

    def __init__(self, logdir: str) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._w = EventFileWriter(logdir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        self._w.add_event(Event(wall_time=float(step), step=step, summary=summary))

    def __enter__(self) -> "SummaryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._w.close()


def test_tensorboard_event_dir(tmp_path):
    clean = healthy_loss(11, 2500, sigma=0.0)
    with SummaryWriter(str(tmp_path / "tb")) as w:
        for s in _loss():
            w.add_scalar("train/loss", s.value, s.step)
            w.add_scalar("train/grad_norm", 1.0, s.step)
            if s.step % 100 == 0:
                w.add_scalar("eval/loss", clean[s.step].value * 1.1, s.step)
    series = load_series(tmp_path / "tb")
    assert {"loss", "grad_norm", "val_loss"} <= set(series)
    assert _kinds(analyze_file(tmp_path / "tb")) == [("loss_spike", 800), ("loss_spike", 1600)]
    event_file = next((tmp_path / "tb").glob("*tfevents*"))
    assert _kinds(analyze_file(event_file)) == [("loss_spike", 800), ("loss_spike", 1600)]


def test_tensorboard_subdirectories_prefix_tags(tmp_path):
    for sub, scale in (("train", 1.0), ("validation", 1.1)):
        with SummaryWriter(str(tmp_path / "tb" / sub)) as w:
            for s in _loss()[::10]:
                w.add_scalar("epoch_loss", s.value * scale, s.step)
    series = load_series(tmp_path / "tb")
    assert "loss" in series and "val_loss" in series


def test_healthy_log_has_no_findings(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text("step,loss\n" + "\n".join(f"{s.step},{s.value}" for s in healthy_loss(2, 5000)))
    assert analyze_file(path) == []


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("a.csv", "loss,lr\n1.0,0.1\n", "no 'step' column"),
        ("b.csv", "step,loss\n0,1.0\n1,abc\n", r"line 3, column 'loss': 'abc' is not a number"),
        ("c.csv", "step,loss\n0,1.0\nx,1.0\n", "line 3, column 'step'"),
        ("d.csv", "", "empty CSV"),
        ("e.jsonl", '{"step": 0, "loss": 1.0}\n{"step": 1, "loss": "high"}\n', r"line 2, field 'loss'"),
        ("f.jsonl", '{"loss": 1.0}\n', "line 1: no 'step' field"),
        ("g.jsonl", '{"step": 0}\nnot json\n', "line 2: not valid JSON"),
        ("h.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("i.dat", "hello world\n", "unknown log format"),
    ],
)
def test_clear_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnalyzeError, match=match):
        analyze_file(path)


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(AnalyzeError, match="no such file"):
        analyze_file(tmp_path / "nope.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalyzeError, match="no TensorBoard event files"):
        analyze_file(tmp_path / "empty")


def test_binary_file_with_csv_name(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(AnalyzeError):
        analyze_file(path)


def test_cli_json_and_table(tmp_path, capsys):
    path = write_csv(tmp_path / "log.csv")
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert _kinds(out) == [("loss_spike", 800), ("loss_spike", 1600)]
    assert main([str(path)]) == 0
    table = capsys.readouterr().out
    assert "loss_spike" in table and "800" in table and "2 incident(s)" in table


def test_cli_error_exit_code(tmp_path, capsys):
    assert main([str(tmp_path / "missing.csv")]) == 2
    assert "error" in capsys.readouterr().err


def test_subparser_wiring(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="trainguard")
    add_analyze_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", str(write_csv(tmp_path / "log.csv")), "--json"])
    assert args.func is run_analyze and args.func(args) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_log_with_a_rollback_still_shows_the_spike_it_was_rolled_back_from(tmp_path):
    import json as _json
    import math as _math

    from trainguard.service.analyze import analyze_file as _analyze

    rows = [{"step": s, "loss": 3.0 * _math.exp(-s / 300) * (1 + 0.02 * ((s * 7) % 5 - 2))} for s in range(1, 81)]
    for r in rows[60:70]:
        r["loss"] *= 4.0  # the spike at steps 61..70
    replay = [{"step": s, "loss": 3.0 * _math.exp(-s / 300)} for s in range(51, 121)]  # rolled back to 50
    p = tmp_path / "metrics-rank0.jsonl"
    p.write_text("\n".join(_json.dumps(r) for r in rows + replay) + "\n")
    spikes = [f for f in _analyze(p) if f["kind"] == "loss_spike"]
    assert len(spikes) == 1 and spikes[0]["onset_step"] == 61
