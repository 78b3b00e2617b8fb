"""detection_quality: precision, recall, onset error and false alarms of the detectors on a labelled set.

The set (tests/bench/data/detection, sources and licences in its README.md; rebuilt by its
build.py) is made of real training curves:
- a public one: the per-step train loss (and val loss every 125 steps) of a 5,100-step GPT-2
  (124M) run from KellerJordan/modded-nanogpt's records (MIT), healthy;
- the project's own GPT (workers/model.py) trained on CPU by build.py: healthy runs (loss,
  grad norm before clipping, LR, val loss), and one learning-rate sweep
  whose runs are labelled `stable` or `unstable` by a rule stated in build.py (100-step medians
  of the loss rising >= 10% above their running minimum twice, or for 300 steps), not by a detector;
- one real fault shape labelled by its authors: BLOOM-176B's "first lm loss spike" at iteration
  31216 (bigscience-workshop/bigscience, Apache-2.0), loss and grad norm per iteration.

Every healthy curve is replayed as it is (its findings are false alarms), then copies of it get
one injected fault each, with a known kind, onset and end (seeded, so the set is the same on
every run): loss spikes (x2-x10, 2-20 steps), the BLOOM spike (loss and grad norm, scaled to the
curve), grad-norm explosions (x10-x1000, 3-30 steps), a non-finite loss or grad norm, divergence
ramps (to x1.5-x3 over 100-1,000 steps, never recovering), sustained oscillations (the
instability detector's case: +6-30% or +12-60%, period 60-300 steps, while the LR is
high), and overfitting (val loss rising 1-3% per evaluation while the train loss falls).

Replay: `trainguard analyze`'s `analyze_series` (service/analyze.py), the detectors with their
defaults, which are the watch's (`WatchConfig()`); the whole curve at once, every episode found.
The uninjected curves (healthy ones and the sweep) are also replayed through the live path,
`evaluate_stage` over the last 400 per-step records every 5 steps (`watch_*` figures).

Scoring, per detector:
- a finding matches a labelled event of its kind when its onset lies in [onset - 100, end + 100]
  (end = the last step for faults that never recover);
- recall = events matched / events; onset error = |finding onset - labelled onset| (median, max);
- false alarms = findings on the healthy (uninjected) curves, and for the instability detector
  on the sweep's stable runs too (they are labelled for instability only), per 100,000 of their
  steps; precision = matched / (matched + findings in no labelled window);
  findings inside another kind's window (a spike's grad norm also exploding) are counted apart
  (`cross`), neither right nor wrong.

Rows `detection_quality_<detector>`: ours = recall, baseline = the target recall 0.95 (issue 14),
higher is better; the other figures are secondary. The instability row adds the sweep: unstable
runs flagged, stable runs flagged. The per-detector table is logged (stderr) as well.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.core import Context, Measurement, benchmark, log

DATA = Path(__file__).resolve().parent / "data" / "detection"
KINDS = ("loss_spike", "grad_explosion", "nan", "divergence", "instability", "val_divergence")
TARGET_RECALL = 0.95
SMOKE_STEPS = 1500
PRE, POST = 100, 100  # a finding's onset may lie this far before a labelled onset / after its end


@dataclass
class Event:
    kinds: tuple[str, ...]
    onset: int
    end: int  # last faulty step (the curve's last step for faults that never recover)
    what: str = ""


@dataclass
class Case:
    name: str
    series: dict[str, list]  # metric -> [Sample]
    events: list[Event] = field(default_factory=list)
    negative: bool = False  # healthy curve or stable sweep run: every finding on it is a false alarm
    sweep: str | None = None  # "stable" / "unstable" for the sweep's runs
    host: str = ""  # the healthy curve it was made from
    labelled: frozenset[str] = frozenset(KINDS)  # kinds the curve is labelled for (the sweep: instability)


# -- loading --------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def load_curve(entry: dict) -> dict[str, list]:
    """Metric -> samples, as `trainguard analyze` reads a CSV."""
    from trainguard.service.domain.series import Sample

    out: dict[str, list] = {}
    for row in _read_rows(DATA / entry["file"]):
        step = int(row["step"])
        for key, raw in row.items():
            if key == "step" or raw in ("", None):
                continue
            out.setdefault(key, []).append(Sample(step, float(raw)))
    return out


def manifest() -> list[dict]:
    return json.loads((DATA / "manifest.json").read_text())["curves"]


def bloom_template() -> tuple[list[float], list[float]]:
    """Loss and grad-norm ratios to the pre-spike iteration (31214), iterations 31214..31251; the
    elided 31223..31249 are filled log-linearly between 31222 and 31250."""
    rows = _read_rows(DATA / "public" / "bloom-176b-spike-31216.csv")
    known = {int(r["iteration"]): (float(r["lm_loss"]), float(r["grad_norm"])) for r in rows}
    first, last = min(known), max(known)
    base_l, base_g = known[first]
    loss, grad = [], []
    for it in range(first, last + 1):
        if it in known:
            v_l, v_g = known[it]
        else:
            a = max(k for k in known if k < it)
            b = min(k for k in known if k > it)
            w = (it - a) / (b - a)
            v_l = math.exp((1 - w) * math.log(known[a][0]) + w * math.log(known[b][0]))
            v_g = math.exp((1 - w) * math.log(known[a][1]) + w * math.log(known[b][1]))
        loss.append(v_l / base_l)
        grad.append(v_g / base_g)
    return loss, grad


BLOOM_ONSET_OFFSET = 2  # the template starts at 31214; the authors' spike starts at 31216
BLOOM_END_OFFSET = 36  # ... and ends at 31250


# -- injections -----------------------------------------------------------------------------------
def _scaled(xs: list, start: int, factors: Iterable[float]):
    from trainguard.service.domain.series import Sample

    out = list(xs)
    for i, f in zip(range(start, len(out)), factors):
        s = out[i]
        out[i] = Sample(s.step, s.value * f, s.time)
    return out


def _index(xs: list, step: int) -> int:
    return next(i for i, s in enumerate(xs) if s.step >= step)


def _with(series: dict[str, list], **changed: list) -> dict[str, list]:
    return {**series, **changed}


def inject(name: str, series: dict[str, list], smoke: bool) -> list[Case]:
    """Copies of a healthy curve, each with one labelled fault (seeded by curve name and case)."""
    from trainguard.service.domain.series import Sample

    loss = series["loss"]
    n = len(loss)
    last = loss[-1].step
    grad = series.get("grad_norm")
    val = series.get("val_loss")
    cases: list[Case] = []

    def rng(tag: str) -> random.Random:
        return random.Random(f"{name}/{tag}")

    def onset_in(r: random.Random, lo: float, hi: float) -> int:
        return loss[r.randrange(max(200, int(lo * n)), max(201, int(hi * n)))].step

    def pulses(key: str, kind: str, prefix: str, mags: tuple[float, ...], durs: tuple[int, ...]) -> None:
        """`series[key]` multiplied by each magnitude for each duration, at a seeded onset."""
        xs = series[key]
        for mag in mags:
            for dur in durs:
                tag = f"{prefix}-x{mag:g}-{dur}"
                at = onset_in(rng(tag), 0.1, 0.9)
                i = _index(xs, at)
                cases.append(Case(f"{name}+{tag}@{at}", _with(series, **{key: _scaled(xs, i, [mag] * dur)}),
                                  [Event((kind,), at, xs[min(i + dur, len(xs)) - 1].step, tag)]))

    pulses("loss", "loss_spike", "spike", *(((3.0,), (4,)) if smoke else ((2.0, 3.0, 5.0, 10.0), (2, 4, 10, 20))))
    tl, tg = bloom_template()
    for k in range(1 if smoke else 4):
        tag = f"bloom176b-{k}"
        at = onset_in(rng(tag), 0.1, 0.9)
        i = _index(loss, at) - BLOOM_ONSET_OFFSET
        changed = {"loss": _scaled(loss, i, tl)}
        kinds: tuple[str, ...] = ("loss_spike",)
        if grad:
            changed["grad_norm"] = _scaled(grad, _index(grad, loss[i].step), tg)
            kinds = ("loss_spike", "grad_explosion")
        end = loss[min(i + BLOOM_END_OFFSET, n - 1)].step
        cases.append(Case(f"{name}+{tag}@{at}", _with(series, **changed), [Event(kinds, at, end, tag)]))
    if grad:
        pulses("grad_norm", "grad_explosion", "grad",
               *(((100.0,), (10,)) if smoke else ((10.0, 100.0, 1000.0), (3, 10, 30))))
    for metric in ("loss", "grad_norm"):
        xs = series.get(metric)
        if not xs:
            continue
        tag = f"nan-{metric}"
        at = onset_in(rng(tag), 0.1, 0.9)
        i = _index(xs, at)
        cases.append(Case(f"{name}+{tag}@{at}", _with(series, **{metric: _scaled(xs, i, [math.nan])}),
                          [Event(("nan",), at, at, tag)]))
    for rise, ramp in (((2.0, 300),) if smoke else ((1.5, 100), (2.0, 300), (3.0, 1000))):
        tag = f"diverge-x{rise:g}-{ramp}"
        at = onset_in(rng(tag), 0.3, 0.6)
        i = _index(loss, at)
        factors = (1 + (rise - 1) * min(1.0, k / ramp) for k in range(n - i))
        cases.append(Case(f"{name}+{tag}@{at}", _with(series, loss=_scaled(loss, i, factors)),
                          [Event(("divergence",), at, last, tag)]))
    for amp, period in (((0.6, 150),) if smoke else ((0.3, 60), (0.3, 150), (0.6, 60), (0.6, 150), (0.6, 300))):
        tag = f"oscillate-a{amp:g}-p{period}"
        r = rng(tag)
        # while the LR is still >= 0.5 x its peak (the first ~55% of a cosine schedule)
        at = onset_in(r, 0.15, 0.3)
        i = _index(loss, at)
        factors, phase = [], 0.0
        for k in range(n - i):
            phase += 2 * math.pi / (period * r.uniform(0.7, 1.3))
            factors.append(1 + amp * (0.6 + 0.4 * math.sin(phase)) * min(1.0, k / 30))
        cases.append(Case(f"{name}+{tag}@{at}", _with(series, loss=_scaled(loss, i, factors)),
                          [Event(("instability",), at, last, tag)]))
    if val and len(val) >= 12:
        for g in ((0.03,) if smoke else (0.01, 0.03)):
            tag = f"overfit-{g:g}"
            r = rng(tag)
            j = r.randrange(int(0.4 * len(val)), int(0.7 * len(val)))
            at = val[j].step
            bumped = list(val)
            for k in range(j, len(val)):
                s = val[k]
                bumped[k] = Sample(s.step, s.value * (1 + g * (k - j + 1)), s.time)
            cases.append(Case(f"{name}+{tag}@{at}", _with(series, val_loss=bumped),
                              [Event(("val_divergence",), at, last, tag)]))
    for c in cases:
        c.host = name
    return cases


# -- cases, replay, scoring -----------------------------------------------------------------------
def build_cases(smoke: bool) -> list[Case]:
    cases: list[Case] = []
    entries = manifest()
    hosts = [e for e in entries if e["label"] == "healthy"]
    if smoke:  # one own run (it has every metric), cut to its first 1,500 steps
        hosts = [next(e for e in hosts if e["file"].startswith("runs/"))]
    for e in hosts:
        series = load_curve(e)
        if smoke:
            series = {k: [s for s in v if s.step < SMOKE_STEPS] for k, v in series.items()}
        cases.append(Case(e["name"], series, negative=True, host=e["name"]))
        cases += inject(e["name"], series, smoke)
    for e in entries:
        if e.get("sweep") and not smoke:
            series = load_curve(e)
            last = series["loss"][-1].step
            events = [Event(("instability",), ev["onset"], last, "sweep") for ev in e.get("events", [])]
            cases.append(Case(e["name"], series, events, negative=e["label"] == "stable", sweep=e["label"],
                              host=e["name"], labelled=frozenset({"instability"})))
    return cases


def replay(case: Case) -> list[dict]:
    from trainguard.service.analyze import analyze_series

    return analyze_series(case.series)


WATCH_BUFFER = 400  # service/supervisor/stage.py BUFFER_STEPS
WATCH_EVERY = 5  # steps between two watch cycles (a 0.5 s watch over a run doing ~10 steps/s)


@dataclass
class _Signals:
    """What the supervisor's ActiveStage hands evaluate_stage, for one rank."""
    kind: str = "pretrain"
    records: dict = field(default_factory=dict)
    handled_until: dict = field(default_factory=dict)
    counter_series: dict = field(default_factory=dict)
    heartbeat: dict = field(default_factory=dict)
    paused_ranks: frozenset = frozenset()
    last_step: int = -1
    started_at: float = 0.0
    resumed_at: float = 0.0
    ranks: tuple = (0,)
    steps: int = 10**9
    idle: dict = field(default_factory=dict)  # no busy readings: the heartbeat rule alone


def watch_replay(case: Case, every: int = WATCH_EVERY) -> list[dict]:
    """The live path: `evaluate_stage` with `WatchConfig()` every WATCH_EVERY steps over the last
    400 per-step records, each episode handled once (handled_until = its detected-at step, as the
    recovery executor sets it); observe only: nothing is rolled back."""
    from collections import deque

    from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage

    by_step: dict[int, dict] = {}
    for key, xs in case.series.items():
        for smp in xs:
            by_step.setdefault(smp.step, {"step": smp.step, "time": float(smp.step)})[key] = smp.value
    sig = _Signals()
    buf: deque = deque(maxlen=WATCH_BUFFER)
    sig.records[0] = buf
    cfg = WatchConfig()
    found: dict[tuple[str, int], int] = {}
    for i, step in enumerate(sorted(by_step)):
        buf.append(by_step[step])
        sig.last_step, sig.heartbeat[0] = step, float(step)
        if i % every:
            continue
        for f in evaluate_stage(sig, cfg, now=float(step)):
            if f.kind in KINDS:
                found.setdefault((f.kind, f.onset_step), f.detected_at_step)
                sig.handled_until[f.kind] = f.detected_at_step
    return [{"kind": k, "onset_step": o, "detected_at_step": d} for (k, o), d in sorted(found.items(), key=lambda x: x[0][1])]


def _steps(case: Case) -> int:
    return len(case.series["loss"])


def score(cases: list[Case], findings: list[list[dict]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per-detector figures, and the labelled events each detector missed (for the log)."""
    out: dict[str, dict[str, float]] = {}
    missed: list[str] = []
    # a false alarm on a healthy curve recurs in every copy made from it: counted once
    inherited = {(c.host, f["kind"], f["onset_step"]) for c, fs in zip(cases, findings) if c.negative for f in fs}
    for kind in KINDS:
        healthy_steps = sum(_steps(c) for c in cases if c.negative and kind in c.labelled)
        events = matched = false = fa = 0
        cross: set[tuple[str, int]] = set()
        errors: list[int] = []
        delays: list[int] = []
        for case, fs in zip(cases, findings):
            if kind not in case.labelled:
                continue  # the sweep's runs are labelled for instability only
            mine = [f for f in fs if f["kind"] == kind]
            if case.negative:
                fa += len(mine)
            used: set[int] = set()
            for ev in case.events:
                if kind not in ev.kinds:
                    continue
                events += 1
                hit = next((k for k, f in enumerate(mine) if k not in used
                            and ev.onset - PRE <= f["onset_step"] <= ev.end + POST), None)
                if hit is None:
                    missed.append(f"{kind} missed {case.name} (onset {ev.onset}, end {ev.end})")
                    continue
                used.add(hit)
                matched += 1
                errors.append(abs(mine[hit]["onset_step"] - ev.onset))
                delays.append(mine[hit]["detected_at_step"] - ev.onset)
            for k, f in enumerate(mine):
                if k in used:
                    continue
                inside = [ev for ev in case.events if ev.onset - PRE <= f["onset_step"] <= ev.end + POST]
                if inside:
                    cross.update((case.name, ev.onset) for ev in inside if kind not in ev.kinds)
                elif not case.negative and (case.host, kind, f["onset_step"]) not in inherited:
                    false += 1
        row = {
            "recall": matched / events if events else float("nan"),
            "precision": matched / (matched + false + fa) if matched + false + fa else float("nan"),
            "onset_error_median": statistics.median(errors) if errors else float("nan"),
            "onset_error_max": float(max(errors)) if errors else float("nan"),
            "delay_median": statistics.median(delays) if delays else float("nan"),
            "false_alarms_per_100k": fa / healthy_steps * 1e5 if healthy_steps else float("nan"),
            "false_alarms": float(fa), "healthy_steps": float(healthy_steps), "events": float(events),
            "matched": float(matched), "false_in_injected": float(false),
            "cross_events": float(len(cross)),  # labelled events of other kinds this detector also fired on
        }
        if kind == "instability":
            sweep = [(c, fs) for c, fs in zip(cases, findings) if c.sweep]
            for label in ("unstable", "stable"):
                runs = [fs for c, fs in sweep if c.sweep == label]
                row[f"sweep_{label}"] = float(len(runs))
                row[f"sweep_{label}_flagged"] = float(sum(any(f["kind"] == kind for f in fs) for fs in runs))
        out[kind] = row
    return out, missed


def breakdown(cases: list[Case], findings: list[list[dict]]) -> list[str]:
    """Recall per injected fault family (the tag without its copy number), per detector."""
    hits: dict[tuple[str, str], list[int]] = {}
    for case, fs in zip(cases, findings):
        for ev in case.events:
            family = ev.what.rsplit("-", 1)[0] if ev.what.startswith("bloom") else ev.what
            for kind in ev.kinds:
                ok = any(f["kind"] == kind and ev.onset - PRE <= f["onset_step"] <= ev.end + POST for f in fs)
                hits.setdefault((kind, family), []).append(int(ok))
    return [f"{kind} on {family}: {sum(v)}/{len(v)}" for (kind, family), v in sorted(hits.items())]


def _f(v: float, digits: int = 3) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}g}"


def table(scores: dict[str, dict[str, float]]) -> str:
    head = ("detector", "events", "recall", "precision", "onset error, steps (median/max)",
            "false alarms /100k healthy steps", "false alarms", "also fired on (other kinds' events)")
    rows = [head]
    for kind, r in scores.items():
        rows.append((kind, f"{r['events']:.0f}", _f(r["recall"]), _f(r["precision"]),
                     f"{_f(r['onset_error_median'])} / {_f(r['onset_error_max'])}",
                     _f(r["false_alarms_per_100k"]), f"{r['false_alarms']:.0f}", f"{r['cross_events']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def check_same_defaults() -> None:
    """The replay uses analyze's configs: they must be the watch's."""
    from trainguard.service.analyze import AnalyzeConfig
    from trainguard.service.domain.evaluate import WatchConfig

    a, w = AnalyzeConfig(), WatchConfig()
    for name in ("loss_spike", "grad_explosion", "divergence", "instability", "nan", "val_divergence"):
        if getattr(a, name) != getattr(w, name):
            raise RuntimeError(f"analyze's {name} config differs from the watch's")


@benchmark("detection_quality", reps=1, smoke_reps=1)
def detection_quality(ctx: Context) -> dict[str, Measurement]:
    """Per detector on a labelled set of real curves with injected faults: recall (vs 0.95), precision, onset error, false alarms."""
    check_same_defaults()
    cases = build_cases(ctx.smoke)
    findings = [replay(c) for c in cases]
    scores, missed = score(cases, findings)
    # the uninjected curves once more through the live watch's path: false alarms and the sweep
    watched = [(c, watch_replay(c, every=25 if ctx.smoke else WATCH_EVERY)) for c in cases if c.negative or c.sweep]
    for kind, r in scores.items():
        r["watch_false_alarms"] = float(sum(f["kind"] == kind for c, fs in watched if c.negative and kind in c.labelled
                                            for f in fs))
    for label in ("unstable", "stable"):
        scores["instability"][f"watch_sweep_{label}_flagged"] = float(sum(
            any(f["kind"] == "instability" for f in fs) for c, fs in watched if c.sweep == label))
    steps = sum(_steps(c) for c in cases)
    log(f"  detection_quality: {len(cases)} curves ({sum(c.negative for c in cases)} healthy/stable), "
        f"{steps} steps replayed, {sum(len(c.events) for c in cases)} labelled events")
    for line in table(scores).splitlines():
        log("  " + line)
    if not ctx.smoke:
        log("  recall per fault family: " + "; ".join(breakdown(cases, findings)))
        for line in missed:
            log(f"  {line}")
        for case, fs in zip(cases, findings):
            if case.negative and fs:
                log(f"  findings on {case.name} ({'healthy' if case.sweep is None else 'sweep, ' + case.sweep}; "
                    f"labelled for {', '.join(sorted(case.labelled)) if case.sweep else 'every kind'}): "
                    f"{[(f['kind'], f['onset_step']) for f in fs]}")
    out: dict[str, Measurement] = {}
    for kind, r in scores.items():
        if not r["events"]:
            continue
        recall = r["recall"]
        extra = {k: v for k, v in r.items() if k != "recall" and not (isinstance(v, float) and math.isnan(v))}
        out[f"detection_quality_{kind}"] = Measurement(max(recall, 1e-3), TARGET_RECALL, "recall",
                                                       "target recall 0.95 (issue 14)", higher_is_better=True,
                                                       extra=extra)
    return out
