"""The worker process's busy counter (workers/runtime/busy.py), read from the real kernel:
a thread that computes counts about its wall time, one that sleeps counts nothing, and one
that is runnable but starved of CPU (another process pinned to the same core) still counts
about its wall time — load is not idleness. Threads that come and go never make it go back."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

from trainguard.workers.runtime.busy import ProcessBusy, available
from trainguard.workers.runtime import exporter as exporter_module
from trainguard.workers.runtime.exporter import Exporter


_BLOCK = bytes(256 * 1024)


def _spin(seconds: float) -> float:
    """Compute for `seconds` of wall time; returns this thread's CPU seconds meanwhile. The work
    (sha256 of 256 KiB blocks) runs without the GIL: a pure-Python loop would sleep on the GIL
    whenever another thread of the suite's process holds it, and waiting for the GIL is not
    waiting for a CPU (three 0.1 s spins in the suite once counted 0.18 s in all)."""
    c0, end = time.thread_time(), time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(_BLOCK)
    return time.thread_time() - c0


def test_schedstat_is_readable_here() -> None:
    assert available()  # CI's Linux has it; without it the exporter would export no counter


def test_computing_counts_its_wall_time_and_sleeping_counts_nothing() -> None:
    busy = ProcessBusy()
    b0 = busy.seconds()
    assert b0 == 0.0  # counts from the first read
    time.sleep(0.3)
    idle = busy.seconds() - b0
    # the process's other threads still wake now and then (a Ray driver's, when the suite
    # started one): well under the half-busy line the supervisor draws
    assert idle < 0.25 * 0.3
    b1 = busy.seconds()
    _spin(0.3)
    assert busy.seconds() - b1 >= 0.27


def test_a_runnable_thread_starved_of_cpu_still_counts_as_busy() -> None:
    """Pinned to one core beside a process spinning on it, this thread gets about half of it;
    the counter (CPU time + run-queue wait) still advances at wall speed."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\n"
                            "while True: pass"], stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None
        hog.stdout.readline()  # pinned, and spinning from now on
        os.sched_setaffinity(0, {cpu})
        busy = ProcessBusy()
        b0 = busy.seconds()
        t0 = time.monotonic()
        cpu_s = _spin(0.6)
        wall = time.monotonic() - t0
        counted = busy.seconds() - b0
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    assert cpu_s < 0.8 * wall, f"not starved: {cpu_s:.2f}s CPU in {wall:.2f}s"  # the set-up did what it says
    assert counted >= 0.9 * wall, f"{counted:.2f}s busy counted in {wall:.2f}s"


def test_threads_that_start_and_end_never_turn_the_counter_back() -> None:
    busy = ProcessBusy()
    busy.seconds()
    seen = [busy.seconds()]
    for _ in range(3):
        t = threading.Thread(target=_spin, args=(0.2,))
        t.start()
        time.sleep(0.1)
        seen.append(busy.seconds())  # counts what the new thread did so far
        t.join()
        seen.append(busy.seconds())  # its last interval ended with it: lost, not subtracted
    assert seen == sorted(seen)
    assert seen[-1] - seen[0] >= 0.2  # about 0.1 s of each thread's 0.2 s


def test_the_exporter_reads_it_afresh_only_when_the_step_loop_is_quiet(monkeypatch) -> None:
    ex = Exporter("r", "s", 0)

    def exported() -> float:
        (line,) = [ln for ln in ex.text().decode().splitlines()
                   if ln.startswith("trainguard_process_busy_seconds_total{")]
        return float(line.rsplit(" ", 1)[1])

    first = exported()
    ex.set("trainguard_last_step_timestamp_seconds", time.time())  # a step just finished
    monkeypatch.setattr(exporter_module, "BUSY_AFTER_S", 600.0)  # ...and the loop counts as busy for 10 min
    _spin(0.1)
    assert exported() == first  # within BUSY_AFTER_S of a step: the previous reading
    monkeypatch.setattr(exporter_module, "BUSY_AFTER_S", 0.0)  # any age is quiet
    _spin(0.1)
    assert exported() >= first + 0.15  # read afresh, every spin since the first reading counted
