"""(Re)build the detection_quality evaluation set (tests/bench/b_detection_quality.py).

    .venv/bin/python tests/bench/data/detection/build.py record [--only NAME ...]
    .venv/bin/python tests/bench/data/detection/build.py public modded-nanogpt LOGFILE
    .venv/bin/python tests/bench/data/detection/build.py manifest

`record`: trains the project's own GPT (workers/model.py, the pretrain stage's data and
batches, AdamW betas (0.9, 0.95), grad clip 1.0, weight decay 0.1, the harness's warmup +
cosine LR schedule) for every run in RUNS and writes `runs/<name>.csv.gz`
(step, loss, grad_norm, lr, val_loss): grad_norm is the norm before clipping, lr the one the
step used, val_loss the held-out loss (8 batches) every `eval_every` steps; 5 significant
digits (4 for grad_norm and lr). Deterministic on CPU for a given torch version (one thread):
the committed files were recorded with this script (torch 2.13 CPU); rebuilding them all takes
about an hour of one CPU core. Then it rewrites manifest.json.

`public`: converts a public log into `public/<name>.csv.gz` (see README.md for the sources,
their licences and what their authors labelled).

`manifest`: rewrites manifest.json (every curve, its source, licence, config and label; the
sweep's labels come from `sweep_label`) from the files present.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]

# name -> recording settings. `sweep` runs are one learning-rate sweep (same model, data, seed
# and steps; only the peak LR differs); their stable/unstable labels go to manifest.json.
RUNS: dict[str, dict] = {}


def _run(name: str, **kw) -> None:
    RUNS[name] = {"size": "tiny", "steps": 5000, "seed": 11, "batch_size": 8, "lr": 3e-3, "warmup": 100,
                  "eval_every": 100, "eval_batches": 8, "min_lr_ratio": 0.1, "betas": (0.9, 0.95),
                  "grad_clip": 1.0, **kw}


# healthy runs: the curves faults are injected into (and whose own findings are false alarms)
_run("tiny-b8-s11", batch_size=8, seed=11)
_run("tiny-b32-s12", batch_size=32, seed=12)
_run("tiny-b32-s13-lr1e-2", batch_size=32, seed=13, lr=1e-2)
_run("small-b16-s11", size="small", batch_size=16, seed=11, steps=3000)
# one learning-rate sweep: the project's defaults (AdamW betas (0.9, 0.95), clip 1.0, warmup + cosine
# to 10%); only the peak LR differs. Labels: sweep_label() below, not a detector.
for _lr in (0.003, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0, 2.0):
    _run(f"sweep-lr{_lr:g}", batch_size=8, seed=11, steps=3000, lr=_lr, sweep="tiny-lr")


DIGITS = {"grad_norm": 4, "lr": 4}  # significant digits kept per column (5 for the losses)


def _fmt(v: float | None, digits: int = 5) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.{digits}g}"


def _spec(name: str, cfg: dict):
    from trainguard.workers.spec import parse_pipeline
    from tests.bench.workload import MODELS

    stage = {"name": "pretrain", "kind": "pretrain", "steps": cfg["steps"], "world_size": 1,
             "batch_size": cfg["batch_size"], "lr": cfg["lr"], "warmup_steps": cfg["warmup"],
             "min_lr_ratio": cfg["min_lr_ratio"], "eval_every": cfg["eval_every"],
             "eval_batches": cfg["eval_batches"]}
    return parse_pipeline({"name": name, "seed": cfg["seed"], "model": MODELS[cfg["size"]],
                           "checkpoint": {"every": 10**6}, "stages": [stage]})


def record(name: str, cfg: dict, out_dir: Path) -> Path:
    """Train one run and write runs/<name>.csv.gz (see the module docstring)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from trainguard.workers.runtime.harness import make_context, schedule_lr
    from trainguard.workers.stages import STAGES

    torch.set_num_threads(1)
    spec = _spec(name, cfg)
    s = spec.stage("pretrain")
    stage = STAGES["pretrain"](make_context(spec, "pretrain", run_id=name))
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=tuple(cfg["betas"]))
    mixture = dict(s.mixture)
    rows = []
    t0 = time.time()
    for step in range(cfg["steps"]):
        lr = schedule_lr(step, base=cfg["lr"], total=cfg["steps"], warmup=cfg["warmup"], min_ratio=cfg["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        res = stage.step(step, step, mixture)
        loss = res.loss.float()
        value = float(loss.detach())
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"]))
        opt.step()
        val = stage.evaluate()["val_loss"] if (step + 1) % cfg["eval_every"] == 0 else None
        rows.append((step, value, gn, lr, val))
        if (step + 1) % 500 == 0:
            print(f"[{name}] step {step + 1}/{cfg['steps']} loss {value:.4f} gn {gn:.3f} lr {lr:.2e} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv.gz"
    write_csv(path, ["step", "loss", "grad_norm", "lr", "val_loss"], rows)
    return path


def write_csv(path: Path, header: list[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r[0], *(_fmt(v, DIGITS.get(h, 5)) for h, v in zip(header[1:], r[1:]))])
    # mtime 0: the same rows give the same bytes
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue().encode())


_NANOGPT = re.compile(r"^step:(\d+)/\d+ (train_loss|val_loss):([0-9.eE+-]+|nan|inf)")


def parse_modded_nanogpt(text: str) -> list[tuple[int, float | None, float | None]]:
    """(step, train_loss, val_loss) from a modded-nanogpt record log: its `step:N/M train_loss:X ...`
    and `step:N/M val_loss:X ...` lines (the code printed above them is skipped)."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for line in text.splitlines():
        m = _NANOGPT.match(line.strip())
        if m:
            (train if m.group(2) == "train_loss" else val)[int(m.group(1))] = float(m.group(3))
    return [(st, train.get(st), val.get(st)) for st in sorted(set(train) | set(val))]


PUBLIC = [
    {"name": "modded-nanogpt-muon-102924", "file": "public/modded-nanogpt-muon-102924.csv.gz", "label": "healthy",
     "source": "https://github.com/KellerJordan/modded-nanogpt/blob/11d07335bb60d0af87896a81d3bd5a482ebd6aaf/"
               "records/102924_Optimizers/8d6193f4-27fc-4e68-899f-af70019a4d54.txt",
     "licence": "MIT (Copyright (c) 2024 Keller Jordan)",
     "what": "GPT-2 124M speedrun record (Muon), 8xH100, 5,100 steps: train loss per step, val loss every 125"},
]
BLOCK, RISE = 100, 0.10  # the sweep's labelling rule (see sweep_label)


def sweep_label(loss: list[float]) -> tuple[str, int | None, list[float]]:
    """A sweep run is `unstable` when the medians of its loss over consecutive 100-step blocks rise
    >= 10% above the lowest block median before them either in two separate rises (an
    oscillation) or for >= 3 blocks in a row (a sustained excursion: more than a warmup bump or a
    spike); the first block of the first rise is the labelled onset. Otherwise `stable`. Coarser
    than the instability detector and independent of it: fixed blocks, no noise model, no LR
    condition."""
    meds = [statistics.median(loss[i:i + BLOCK]) for i in range(0, len(loss) - BLOCK + 1, BLOCK)]
    low, rises, run, longest = math.inf, [], 0, 0
    for k, m in enumerate(meds):
        if m >= low * (1 + RISE):
            if run == 0:
                rises.append(k * BLOCK)
            run += 1
            longest = max(longest, run)
        else:
            run = 0
            low = min(low, m)
    unstable = len(rises) >= 2 or longest >= 3
    return ("unstable", rises[0], meds) if unstable else ("stable", None, meds)


def write_manifest() -> Path:
    """manifest.json: every curve the benchmark reads, with its source, licence and label."""
    curves = [dict(e) for e in PUBLIC]
    for name, cfg in RUNS.items():
        path = HERE / "runs" / f"{name}.csv.gz"
        if not path.exists():
            continue
        entry = {"name": name, "file": f"runs/{name}.csv.gz", "source": "recorded by build.py (this repository)",
                 "licence": "this repository's", "config": {k: v for k, v in cfg.items() if k != "sweep"},
                 "schedule": {k: cfg[k] for k in ("lr", "steps", "warmup", "min_lr_ratio")}}
        if cfg.get("sweep"):
            with gzip.open(path, "rt") as f:
                loss = [float(r["loss"]) for r in csv.DictReader(f)]
            label, onset, meds = sweep_label(loss)
            entry.update(sweep=cfg["sweep"], label=label, block_medians=[round(m, 3) for m in meds])
            if onset is not None:
                entry["events"] = [{"kind": "instability", "onset": onset}]
        else:
            entry["label"] = "healthy"
        curves.append(entry)
    path = HERE / "manifest.json"
    path.write_text(json.dumps({"curves": curves}, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--only", nargs="*", default=None)
    r.add_argument("--out", default=str(HERE / "runs"))
    sub.add_parser("manifest", help="rewrite manifest.json from the files present (labels included)")
    pub = sub.add_parser("public")
    pub.add_argument("source", choices=["modded-nanogpt"])
    pub.add_argument("logfile")
    pub.add_argument("--name", default="modded-nanogpt-muon-102924")
    a = p.parse_args(argv)
    if a.cmd == "manifest":
        print(write_manifest())
        return 0
    if a.cmd == "public":
        rows = parse_modded_nanogpt(Path(a.logfile).read_text())
        (HERE / "public").mkdir(exist_ok=True)
        path = HERE / "public" / f"{a.name}.csv.gz"
        write_csv(path, ["step", "loss", "val_loss"], rows)
        print(f"{path}: {sum(r[1] is not None for r in rows)} train steps, {sum(r[2] is not None for r in rows)} evaluations")
        return 0
    if a.cmd == "record":
        names = a.only or list(RUNS)
        for n in names:
            print(record(n, RUNS[n], Path(a.out)))
        print(write_manifest())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
