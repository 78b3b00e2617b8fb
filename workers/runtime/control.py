"""Control inbox and the cross-rank agreement on which messages apply at a step boundary.

Messages arrive on each rank independently (Ray calls into the actor). At every step
boundary the ranks all-reduce MIN of the highest seq each has received: every rank has
all messages up to that seq, so all apply exactly the same ones at the same step.
"""
from __future__ import annotations

import threading
from typing import Callable

from trainguard.workers.contract import Control

__all__ = ["ControlInbox"]


class ControlInbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Control] = {}
        self._applied = 0  # highest seq already applied

    def put(self, msg: Control) -> None:
        with self._lock:
            if msg.seq > self._applied:
                self._pending[msg.seq] = msg

    def highest_seen(self) -> int:
        """The highest seq this inbox has applied or holds: a sender taking over (a supervisor
        re-attaching to live workers) numbers its messages after it, or they would be dropped."""
        with self._lock:
            return max([self._applied, *self._pending])

    def skip_to(self, seq: int) -> list[int]:
        """Take the seqs up to `seq` as dealt with without applying them: what a sender taking
        over (a re-attaching supervisor) does with the messages its predecessor sent to only
        some ranks. None of those was applied anywhere — a message applies once every rank has
        it — and the ranks that lack one would wait for it forever. Returns the seqs dropped."""
        with self._lock:
            dropped = sorted(s for s in self._pending if s <= seq)
            for s in dropped:
                del self._pending[s]
            self._applied = max(self._applied, seq)
            return dropped

    def highest_contiguous(self) -> int:
        """Highest seq s such that every seq in (applied, s] has arrived (calls can race)."""
        with self._lock:
            s = self._applied
            while s + 1 in self._pending:
                s += 1
            return s

    def take_upto(self, seq: int) -> list[Control]:
        """Remove and return the messages with applied < seq' <= seq, in seq order."""
        with self._lock:
            out = [self._pending.pop(s) for s in sorted(self._pending) if s <= seq]
            self._applied = max(self._applied, seq)
            return out

    def agree(self, min_all_ranks: Callable[[int], int]) -> list[Control]:
        """One agreement round: the messages every rank has, to be applied now."""
        return self.take_upto(min_all_ranks(self.highest_contiguous()))
