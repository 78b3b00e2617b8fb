"""How busy a worker process is, as the kernel's scheduler sees it: the hang detector's second
signal beside the heartbeat.

A rank whose step loop is hung waits (a lock, a collective whose peer never comes, an event
that is never set) and so do its peers, blocked in the next collective: their threads neither
run nor wait to run. A rank that is only slow (a loaded machine, a collector pause, a long
evaluation) has threads that run or sit in the run queue. Linux's schedstat tells the two apart
per thread (`/proc/self/task/<tid>/schedstat`: nanoseconds on a CPU, nanoseconds runnable but
waiting for one): their sum over the process's threads, taken as a counter, advances at about
wall speed per runnable thread however loaded the machine is (one computing thread alone keeps
it at >= 1 s per second), and nearly stands still while every thread sleeps: what remains is
the process's own background threads waking up (Ray's core worker polls, gloo's loop, the
scrapes themselves), measured at 5-20 % of a second per second on this 2-core machine under
load, their run-queue waits included. A thread in uninterruptible sleep (state D: disk I/O, a
checkpoint written to a slow disk) counts as busy for the interval it is seen in.

GPUs: a rank waiting on a GPU usually spins in the CUDA driver (busy); one that blocks in a
hung NCCL collective with blocking sync sleeps (idle), which is right. Where schedstat does
not exist (not Linux, or a kernel without it) there is no reading: `available()` is False and
the exporter exports nothing, so the supervisor falls back on the heartbeat alone.
"""
from __future__ import annotations

import os
import threading
import time

__all__ = ["ProcessBusy", "available"]

_TASKS = "/proc/self/task"


def available() -> bool:
    """schedstat can be read for this process's threads."""
    return _run_and_wait_ns(str(threading.get_native_id())) is not None


class ProcessBusy:
    """A monotonic counter of seconds the process's threads ran or waited to run (summed over
    threads; a thread in state D adds the time since the previous read). Threads that end
    between two reads lose only their last interval; a thread id reused by a new thread counts
    from the new thread's start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}  # tid -> its run + wait ns at the previous read
        self._total_ns = 0
        self._read_at: float | None = None

    def seconds(self) -> float:
        with self._lock:
            now = time.monotonic()
            first = self._read_at is None  # the counter starts at 0 at the first read
            since = 0 if first else int((now - self._read_at) * 1e9)  # type: ignore[operator]
            self._read_at = now
            seen: dict[str, int] = {}
            added = 0
            for tid in os.listdir(_TASKS):
                ns = _run_and_wait_ns(tid)
                if ns is None:
                    continue  # ended while listed
                prev = self._last.get(tid)
                if prev is not None and ns >= prev:
                    added += ns - prev
                elif not first:  # a thread started since the previous read (or its id reused)
                    added += ns
                seen[tid] = ns
            # a thread in disk wait neither runs nor queues: it counts as busy for the interval.
            # Looked for only when less than one thread's worth was busy (a second pass)
            if since and added < since and any(_in_disk_wait(tid) for tid in seen):
                added += since
            self._total_ns += added
            self._last = seen
            return self._total_ns / 1e9


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 512)
    except OSError:
        return None
    finally:
        os.close(fd)


def _run_and_wait_ns(tid: str) -> int | None:
    text = _read(f"{_TASKS}/{tid}/schedstat")
    try:
        run, wait = text.split()[:2]  # type: ignore[union-attr]
        return int(run) + int(wait)
    except (AttributeError, ValueError):
        return None


def _in_disk_wait(tid: str) -> bool:
    text = _read(f"{_TASKS}/{tid}/stat") or b""
    # "tid (comm) S ...": the name may hold spaces and parentheses; the state follows the last ")"
    end = text.rfind(b")")
    return end >= 0 and text[end + 2:end + 3] == b"D"
