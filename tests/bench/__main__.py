"""`python -m tests.bench [--json] [--smoke] [--reps N] [--keep] [NAME ...]` (what ./scripts/bench runs).

Progress goes to stderr. stdout gets the table, or with --json exactly
`{NAME: {"ours", "baseline", "unit", "ratio", "baseline_name", "runs"}}`.
NAME is a benchmark (all its rows run) or one of its rows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

from tests.bench.core import REGISTRY, Context, aggregate, log, workdir
from tests.bench.suite import ORDER, load_all

JSON_KEYS = ("ours", "baseline", "unit", "ratio", "baseline_name", "runs")


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2e}"


def table(results: dict[str, dict]) -> str:
    head = ["benchmark", "ours", "baseline", "unit", "ratio", "baseline name", "ours median/min/max (runs)"]
    rows = [head]
    for name, r in results.items():
        better = "higher" if r["higher_is_better"] else "lower"
        rows.append([name, _fmt(r["ours"]), _fmt(r["baseline"]), r["unit"], f"{_fmt(r['ratio'])} ({better} better)",
                     r["baseline_name"], f"{_fmt(r['ours'])} / {_fmt(r['min'])} / {_fmt(r['max'])} ({r['runs']})"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    extras = [f"- {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r["extra"].items())
              for name, r in results.items() if r["extra"]]
    if extras:
        out += ["", "secondary figures (medians over the runs):", *extras]
    return "\n".join(out)


def select(names: list[str]) -> list[tuple[str, set[str] | None]]:
    """[(benchmark, rows wanted or None for all)] in suite order."""
    if not names:
        return [(n, None) for n in ORDER]
    want: dict[str, set[str] | None] = {}
    for n in names:
        if n in REGISTRY:
            want[n] = None
            continue
        owner = next((b for b in ORDER if n.startswith(b + "_") or n == b), None)
        if owner is None:
            raise SystemExit(f"unknown benchmark {n!r}; known: {', '.join(ORDER)}")
        if want.get(owner, set()) is not None:
            want.setdefault(owner, set()).add(n)  # type: ignore[union-attr]
    return [(b, want[b]) for b in ORDER if b in want]


def run(names: list[str], *, smoke: bool, reps: int | None = None, keep: bool = False) -> dict[str, dict]:
    load_all()
    chosen = select(names)
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    with workdir(keep=keep) as wd:
        if keep:
            log(f"work directory kept: {wd}")
        for name, rows in chosen:
            b = REGISTRY[name]
            n = reps or (b.smoke_reps if smoke else b.reps)
            collected: dict[str, list] = {}
            t0 = time.perf_counter()
            for rep in range(n):
                log(f"{name}: repetition {rep + 1}/{n}{' (smoke size)' if smoke else ''}")
                t_rep = time.perf_counter()
                ms = b.fn(Context(smoke=smoke, workdir=wd, rep=rep))
                for row, m in ms.items():
                    if rows is None or row in rows:
                        collected.setdefault(row, []).append(m)
                        log(f"  {row}: ours {_fmt(m.ours)} {m.unit}, baseline {_fmt(m.baseline)} {m.unit} "
                            f"({m.baseline_name})" + (f"; {', '.join(f'{k}={_fmt(v)}' for k, v in m.extra.items())}"
                                                      if m.extra else ""))
                log(f"{name}: repetition {rep + 1} took {time.perf_counter() - t_rep:.1f}s")
            for row, ms_ in collected.items():
                results[row] = aggregate(row, ms_)
            log(f"{name}: done in {time.perf_counter() - t0:.1f}s")
    log(f"all done in {time.perf_counter() - t_all:.1f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks (or rows) to run; all by default")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--smoke", action="store_true", help="smallest size, one repetition (what the test suite runs)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per benchmark (default: the benchmark's own)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (state dirs, logs) for inspection")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if a.list:
        load_all()
        for n in ORDER:
            print(f"{n}: {REGISTRY[n].doc.splitlines()[0] if REGISTRY[n].doc else ''}")
        return 0
    # Ray (raylet notices, worker output) and libraries write to fd 1 directly: while the
    # benchmarks run, fd 1 points at stderr, so stdout carries only the table or the JSON.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        results = run(a.names, smoke=a.smoke, reps=a.reps, keep=a.keep)
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - show what broke, exit non-zero
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    if a.json:
        print(json.dumps({k: {j: r[j] for j in JSON_KEYS} for k, r in results.items()}, indent=1))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
