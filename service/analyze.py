"""`trainguard analyze FILE`: replay a training log offline through the live detectors.

Formats:
- CSV with a `step` column and one column per metric (header names as below);
- JSONL, one object per line with "step" and metrics — including the workers'
  own per-step history records ({"step", "loss", "grad_norm", "lr", "anomaly", ...});
- TensorBoard event files, or a directory holding them (sub-directories such as
  train/ and validation/ prefix their tags).

Metric names are normalised: train_loss -> loss, eval_loss -> val_loss, learning_rate
-> lr, trainguard_ prefixes dropped; TensorBoard tags are mapped by the words in them
(loss, val/eval, grad+norm, lr, reward, kl, chosen, rejected, margin, and PPO's
value loss, entropy, clipfrac, approxkl, ratio, response length).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard.service.domain import detectors as d
from trainguard.service.domain.series import Sample, as_samples

__all__ = ["AnalyzeConfig", "AnalyzeError", "analyze_file", "analyze_series", "load_series", "add_analyze_parser", "run_analyze", "main"]


class AnalyzeError(ValueError):
    """A log that cannot be analyzed; the message names the file and, where it applies, line and column."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AnalyzeConfig:
    """Detector configs used for the replay (the live defaults unless given)."""

    loss_spike: d.LossSpikeConfig = d.LossSpikeConfig()
    divergence: d.DivergenceConfig = d.DivergenceConfig()
    instability: d.InstabilityConfig = d.InstabilityConfig()
    nan: d.NanConfig = d.NanConfig()
    grad_explosion: d.GradExplosionConfig = d.GradExplosionConfig()
    val_divergence: d.ValDivergenceConfig = d.ValDivergenceConfig()
    reward_hacking: d.RewardHackingConfig = d.RewardHackingConfig()
    dpo_collapse: d.DpoCollapseConfig = d.DpoCollapseConfig()
    policy_ratio: d.PolicyRatioConfig = d.PolicyRatioConfig()
    negative_kl: d.NegativeKlConfig = d.NegativeKlConfig()
    entropy_collapse: d.EntropyCollapseConfig = d.EntropyCollapseConfig()
    response_length: d.ResponseLengthConfig = d.ResponseLengthConfig()
    value_loss: d.ValueLossConfig = d.ValueLossConfig()


_ALIASES = {
    "loss": "loss",
    "train_loss": "loss",
    "training_loss": "loss",
    "val_loss": "val_loss",
    "eval_loss": "val_loss",
    "valid_loss": "val_loss",
    "validation_loss": "val_loss",
    "grad_norm": "grad_norm",
    "gradnorm": "grad_norm",
    "gradient_norm": "grad_norm",
    "lr": "lr",
    "learning_rate": "lr",
    "reward": "reward_mean",
    "reward_mean": "reward_mean",
    "kl": "kl",
    "kl_coef": "kl_coef",
    "kl_target": "kl_target",
    "dpo_chosen_logprob": "dpo_chosen_logprob",
    "chosen_logprob": "dpo_chosen_logprob",
    "dpo_reward_margin": "dpo_reward_margin",
    "reward_margin": "dpo_reward_margin",
    "dpo_rejected_logprob": "dpo_rejected_logprob",
    "rejected_logprob": "dpo_rejected_logprob",
    "ppo_ratio_mean": "ppo_ratio_mean",
    "ratio": "ppo_ratio_mean",
    "ratio_mean": "ppo_ratio_mean",
    "ppo_ratio_max": "ppo_ratio_max",
    "ppo_clip_fraction": "ppo_clip_fraction",
    "clip_fraction": "ppo_clip_fraction",
    "clipfrac": "ppo_clip_fraction",
    "ppo_approx_kl": "ppo_approx_kl",
    "approx_kl": "ppo_approx_kl",
    "approxkl": "ppo_approx_kl",
    "policy_entropy": "policy_entropy",
    "entropy": "policy_entropy",
    "response_length": "response_length",
    "response_len": "response_length",
    "value_loss": "value_loss",
    "vf_loss": "value_loss",
    # TRL's PPO / DPO log names (after normalisation: "objective/kl" -> "objective_kl")
    "objective_kl": "kl",
    "objective_scores": "reward_mean",
    "objective_entropy": "policy_entropy",
    "policy_entropy_avg": "policy_entropy",
    "policy_clipfrac_avg": "ppo_clip_fraction",
    "policy_approxkl_avg": "ppo_approx_kl",
    "val_ratio": "ppo_ratio_mean",
    "loss_value_avg": "value_loss",
    "logps_chosen": "dpo_chosen_logprob",
    "logps_rejected": "dpo_rejected_logprob",
    "rewards_margins": "dpo_reward_margin",
}
# Non-metric fields of the workers' history records and common log metadata.
_META = {"time", "timestamp", "wall_time", "batch_index", "run", "stage", "rank", "epoch", "anomaly", "event", "kind"}


def _normalise(name: str) -> str:
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    key = key.removeprefix("trainguard_")
    return _ALIASES.get(key, key)


def _tag_metric(tag: str) -> str | None:
    """Metric a TensorBoard tag is about, by the words in it."""
    words = set(re.split(r"[^a-z0-9]+", tag.lower())) - {""}
    joined = "_".join(w for w in re.split(r"[^a-z0-9]+", tag.lower()) if w)
    if "chosen" in words and ("logprob" in joined or "logps" in words or "logp" in words):
        return "dpo_chosen_logprob"
    if "rejected" in words and ("logprob" in joined or "logps" in words or "logp" in words):
        return "dpo_rejected_logprob"
    if "margin" in joined:
        return "dpo_reward_margin"
    if "value" in words and "loss" in joined or "vf" in words or "vf_loss" in joined:
        return "value_loss"
    if "entropy" in joined:
        return "policy_entropy"
    if "clipfrac" in joined or "clip_fraction" in joined:
        return "ppo_clip_fraction"
    if "approxkl" in joined or "approx_kl" in joined:
        return "ppo_approx_kl"
    if "ratio" in words and "clip" not in joined:
        return "ppo_ratio_max" if "max" in words else "ppo_ratio_mean"
    if "length" in words and ("response" in words or "completion" in words or "completions" in words):
        return "response_length"
    if "loss" in joined:
        if words & {"val", "valid", "validation", "eval", "evaluation", "test"} or re.search(r"(val|eval)_?loss", joined):
            return "val_loss"
        return "loss"
    if "grad" in joined and "norm" in joined:
        return "grad_norm"
    if words & {"lr"} or "learning_rate" in joined:
        return "lr"
    if "kl" in words:
        if "coef" in words or "beta" in words:
            return "kl_coef"
        return "kl_target" if "target" in words else "kl"
    if "reward" in joined:
        return "reward_mean"
    return None


def _number(raw: str, where: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise AnalyzeError(f"{where}: {raw!r} is not a number") from None


# --------------------------------------------------------------------------- readers


def _read_csv(path: Path) -> dict[str, list[Sample]]:
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            raise AnalyzeError(f"{path}: empty CSV file")
        names = [h.strip() for h in header]
        if "step" not in [n.lower() for n in names]:
            raise AnalyzeError(f"{path}: no 'step' column (columns: {', '.join(names)})")
        step_col = [n.lower() for n in names].index("step")
        metrics = {i: _normalise(n) for i, n in enumerate(names) if i != step_col}
        out: dict[str, list[Sample]] = {}
        for lineno, row in enumerate(rows, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(names):
                raise AnalyzeError(f"{path}: line {lineno}: {len(row)} fields, the header has {len(names)}")
            step = _step(row[step_col].strip(), f"{path}: line {lineno}, column 'step'")
            for i, m in metrics.items():
                raw = row[i].strip()
                if raw == "":
                    continue  # sparse column (e.g. val_loss every N steps)
                v = _number(raw, f"{path}: line {lineno}, column {names[i]!r}")
                out.setdefault(m, []).append(Sample(step, v))
    return out


def _step(raw: Any, where: str) -> int:
    try:
        f = float(raw)
    except (TypeError, ValueError):
        raise AnalyzeError(f"{where}: step {raw!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise AnalyzeError(f"{where}: step {raw!r} is not an integer")
    return int(f)


def _read_jsonl(path: Path) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    anomaly_events: list[tuple[int, str]] = []
    steps: set[int] = set()
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnalyzeError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise AnalyzeError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            if "step" not in rec:
                raise AnalyzeError(f"{path}: line {lineno}: no 'step' field")
            step = _step(rec["step"], f"{path}: line {lineno}, field 'step'")
            steps.add(step)
            for key, v in rec.items():
                if key == "step" or v is None:
                    continue
                if key == "anomaly":
                    anomaly_events.append((step, str(v)))
                    continue
                name = _normalise(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    if key in _META or name not in _ALIASES.values():
                        continue  # metadata (run, stage, ...) is not a metric
                    raise AnalyzeError(f"{path}: line {lineno}, field {key!r}: {v!r} is not a number")
                out.setdefault(name, []).append(Sample(step, float(v)))
    # The guard's per-step "anomaly" field, rebuilt as trainguard_anomalies_total{kind} counters
    # sampled at every logged step (a counter needs the sample before a rise to show it).
    for kind in sorted({k for _, k in anomaly_events}):
        at = sorted(s for s, k in anomaly_events if k == kind)
        ordered = sorted(steps)
        count, j, series = 0, 0, [Sample(ordered[0] - 1, 0.0)]  # zero before the log starts
        for st in ordered:
            while j < len(at) and at[j] <= st:
                count, j = count + 1, j + 1
            series.append(Sample(st, float(count)))
        out[f"anomalies:{kind}"] = series
    return out


def _event_dirs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    dirs = sorted({p.parent for p in path.rglob("*tfevents*") if p.is_file()})
    if not dirs:
        raise AnalyzeError(f"{path}: no TensorBoard event files (*tfevents*) in this directory")
    return dirs


def _read_tensorboard(path: Path) -> dict[str, list[Sample]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # an optional dependency ([test] extra)
        raise AnalyzeError(f"{path}: reading TensorBoard logs needs the 'tensorboard' package") from None
    out: dict[str, list[Sample]] = {}
    root = path if path.is_dir() else path.parent
    for src in _event_dirs(path):
        acc = EventAccumulator(str(src), size_guidance={"scalars": 0, "tensors": 0})
        try:
            acc.Reload()
        except Exception as e:  # noqa: BLE001 - corrupt/truncated files raise assorted errors
            raise AnalyzeError(f"{src}: unreadable TensorBoard events: {e}") from None
        prefix = "" if src.is_file() or src == root else str(src.relative_to(root)) + "/"
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            _add_tag(out, prefix + tag, [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)])
        for tag in tags.get("tensors", []):
            try:
                from tensorboard.util import tensor_util

                events = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto).item()), e.wall_time) for e in acc.Tensors(tag)]
            except Exception:  # noqa: BLE001 - non-scalar tensors (histograms, text) are not metrics
                continue
            _add_tag(out, prefix + tag, events)
    if not out:
        raise AnalyzeError(f"{path}: no scalar series in the TensorBoard events")
    return out


def _add_tag(out: dict[str, list[Sample]], tag: str, events: Iterable[tuple]) -> None:
    name = _tag_metric(tag) or _normalise(tag)
    if name in out and _tag_metric(tag) is not None:
        name = _normalise(tag)  # a second tag for the same metric keeps its own name
    out.setdefault(name, []).extend(Sample(int(s), float(v), float(t)) for s, v, t in events)


def _sniff(path: Path) -> str:
    if path.is_dir() or "tfevents" in path.name:
        return "tensorboard"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    try:
        head = path.read_bytes()[:4096]
    except OSError as e:
        raise AnalyzeError(f"{path}: cannot read: {e.strerror or e}") from None
    text = head.decode("utf-8", errors="replace").lstrip()
    if text.startswith("{"):
        return "jsonl"
    first = text.splitlines()[0] if text else ""
    if "," in first and "step" in first.lower():
        return "csv"
    raise AnalyzeError(f"{path}: unknown log format (expected CSV with a step column, JSONL, or TensorBoard events)")


def load_series(path: str | Path, fmt: str = "auto") -> dict[str, list[Sample]]:
    """Metric name -> samples sorted by step (one per step, the last one logged wins)."""
    return {k: as_samples(v) for k, v in _load_raw(path, fmt).items()}


def _load_raw(path: str | Path, fmt: str = "auto") -> dict[str, list[Sample]]:
    """Metric name -> samples in the order the log has them."""
    p = Path(path)
    if not p.exists():
        raise AnalyzeError(f"{p}: no such file or directory")
    fmt = _sniff(p) if fmt == "auto" else fmt
    readers: dict[str, Callable[[Path], dict[str, list[Sample]]]] = {
        "csv": _read_csv,
        "jsonl": _read_jsonl,
        "tensorboard": _read_tensorboard,
    }
    if fmt not in readers:
        raise AnalyzeError(f"unknown format {fmt!r} (known: auto, {', '.join(readers)})")
    try:
        raw = readers[fmt](p)
    except UnicodeDecodeError:
        raise AnalyzeError(f"{p}: not a text file (expected {fmt})") from None
    except OSError as e:
        raise AnalyzeError(f"{p}: cannot read: {e.strerror or e}") from None
    return raw


def timelines(raw: dict[str, list[Sample]]) -> list[dict[str, list[Sample]]]:
    """Split a log at its step regressions (a rollback or restart went back in time): each
    timeline is the history as the run lived it, up to the point it was rolled back from.
    A log without regressions is one timeline."""
    per_metric: dict[str, list[list[Sample]]] = {}
    for key, xs in raw.items():
        if key.startswith("anomalies:"):
            continue
        tls: list[list[Sample]] = [[]]
        for smp in xs:
            cur = tls[-1]
            if cur and smp.step <= cur[-1].step:
                tls.append([x for x in cur if x.step < smp.step])
            tls[-1].append(smp)
        per_metric[key] = tls
    counters = {k: as_samples(v) for k, v in raw.items() if k.startswith("anomalies:")}
    n = max((len(v) for v in per_metric.values()), default=1)
    return [{**{k: as_samples(v[min(i, len(v) - 1)]) for k, v in per_metric.items()}, **counters}
            for i in range(n)]


# --------------------------------------------------------------------------- replay


def _scan(detect: Callable[..., d.Finding | None]) -> list[d.Finding]:
    """Every episode `detect(after=...)` finds, resuming after each one's end."""
    found: list[d.Finding] = []
    after: int | None = None
    while True:
        f = detect(after=after)
        if f is None:
            return found
        found.append(f)
        end = f.evidence.get("end_step")
        if end is None:
            return found  # still going on at the end of the log
        after = max(int(end), f.detected_at_step, after if after is not None else end)


def analyze_series(series: dict[str, list[Sample]], config: AnalyzeConfig | None = None) -> list[dict[str, Any]]:
    """Run every detector that has its inputs in `series`; findings sorted by onset."""
    cfg = config or AnalyzeConfig()
    loss = series.get("loss", [])
    grad = series.get("grad_norm", [])
    anomalies = {k.split(":", 1)[1]: v for k, v in series.items() if k.startswith("anomalies:")}
    findings: list[d.Finding] = []
    if loss:
        findings += _scan(lambda after: d.detect_loss_spike(loss, cfg.loss_spike, after=after))
        findings += _scan(lambda after: d.detect_divergence(loss, cfg.divergence, after=after))
        lr = series.get("lr", [])
        findings += _scan(lambda after: d.detect_instability(loss, lr, cfg.instability, after=after))
    if grad:
        findings += _scan(lambda after: d.detect_grad_explosion(grad, cfg.grad_explosion, after=after))
    if loss or grad or anomalies:
        findings += _scan(lambda after: d.detect_nan(loss, grad, anomalies, cfg.nan, after=after))
    if series.get("val_loss") and loss:
        findings += _scan(lambda after: d.detect_val_divergence(series["val_loss"], loss, cfg.val_divergence, after=after))
    if series.get("reward_mean") and series.get("kl"):
        target = series.get("kl_target") or None
        findings += _scan(
            lambda after: d.detect_reward_hacking(series["reward_mean"], series["kl"], target, cfg.reward_hacking, after=after)
        )
    if series.get("dpo_chosen_logprob") and series.get("dpo_reward_margin"):
        findings += _scan(
            lambda after: d.detect_dpo_collapse(series["dpo_chosen_logprob"], series["dpo_reward_margin"], cfg.dpo_collapse, after=after)
        )
    if series.get("ppo_ratio_mean"):
        clip = series.get("ppo_clip_fraction", [])
        findings += _scan(lambda after: d.detect_policy_ratio(series["ppo_ratio_mean"], clip, cfg.policy_ratio, after=after))
    if series.get("kl"):
        findings += _scan(lambda after: d.detect_negative_kl(series["kl"], cfg.negative_kl, after=after))
    if series.get("policy_entropy"):
        findings += _scan(lambda after: d.detect_entropy_collapse(series["policy_entropy"], cfg.entropy_collapse, after=after))
    if series.get("response_length"):
        findings += _scan(lambda after: d.detect_response_length(series["response_length"], cfg.response_length, after=after))
    if series.get("value_loss"):
        findings += _scan(lambda after: d.detect_value_loss_explosion(series["value_loss"], cfg.value_loss, after=after))
    findings.sort(key=lambda f: (f.onset_step, f.kind))
    return [f.to_dict() for f in findings]


def analyze_file(path: str | Path, config: AnalyzeConfig | None = None, fmt: str = "auto") -> list[dict[str, Any]]:
    """Findings in a training log: [{kind, onset_step, detected_at_step, evidence}, ...].
    Raises AnalyzeError (a ValueError) for unreadable or malformed logs."""
    raw = _load_raw(path, fmt)
    if not raw:
        raise AnalyzeError(f"{path}: no metrics found")
    seen: set[tuple[str, int]] = set()
    out: list[dict[str, Any]] = []
    for series in timelines(raw):
        for f in analyze_series(series, config):
            if (f["kind"], f["onset_step"]) not in seen:  # the shared prefix reports once
                seen.add((f["kind"], f["onset_step"]))
                out.append(f)
    return sorted(out, key=lambda f: (f["onset_step"], f["kind"]))


# --------------------------------------------------------------------------- CLI


def add_analyze_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `analyze FILE [--json] [--format ...]` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "analyze",
        help="replay a training log (CSV, JSONL, TensorBoard) through the detectors",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    _add_arguments(p)
    p.set_defaults(func=run_analyze)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="CSV / JSONL log, TensorBoard event file or directory")
    p.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl", "tensorboard"], help="log format (default: by name/content)")


def _table(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return "no incidents found"
    rows = [("KIND", "ONSET", "DETECTED", "SCORE", "THRESHOLD", "END")]
    for f in findings:
        ev = f["evidence"]
        rows.append(
            (
                f["kind"],
                str(f["onset_step"]),
                str(f["detected_at_step"]),
                _fmt(ev.get("score", ev.get("count"))),
                _fmt(ev.get("threshold")),
                "-" if ev.get("end_step") is None else str(ev["end_step"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + f"\n{len(findings)} incident(s)"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def run_analyze(args: argparse.Namespace) -> int:
    """Print the findings (a table, or JSON with --json). 0 on success, 2 when the log cannot be read."""
    try:
        findings = analyze_file(args.file, fmt=getattr(args, "format", "auto"))
    except AnalyzeError as e:
        print(f"trainguard analyze: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(findings, indent=2))
    else:
        print(_table(findings))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainguard analyze", description="Replay a training log through the detectors.")
    _add_arguments(parser)
    return run_analyze(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
