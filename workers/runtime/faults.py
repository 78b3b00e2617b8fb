"""Fault injection, keyed on batch index (FaultSpec.at_step).

Each fault produces its real symptom: the process really dies, the step loop really
blocks, the loss really becomes NaN, the bytes on disk really flip. Data faults
(loss_spike, nan) hit the batch on every rank, as bad data would; process and
hardware faults (worker_crash, hang, slow, gpu_xid) hit only `rank`;
checkpoint_corrupt hits the checkpoint rank 0 writes.

`once` faults write a marker file under `fired_dir` *before* firing, so a fault that
kills the process does not fire again after the supervisor restarts the group.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainguard.workers.contract import FaultKind
from trainguard.workers.spec import FaultSpec
from trainguard.workers.runtime.checkpoint import storage_for
from trainguard.workers.runtime.gpu import GpuHealth

__all__ = ["FaultEffects", "FaultInjector", "corrupt_file"]

DATA_FAULTS = (FaultKind.LOSS_SPIKE, FaultKind.NAN)
DEFAULT_LR_BURST = 100.0
DEFAULT_SLOW_SECONDS = 0.5


@dataclass(frozen=True)
class FaultEffects:
    corrupt: bool = False  # stage.step(..., corrupt=True)
    nan: bool = False  # the loss becomes NaN
    lr_factor: float = 1.0


def corrupt_file(path: str, offset: int | None = None) -> None:
    """Flip one byte of a file (local path or fsspec URL), in the middle by default."""
    st, p = storage_for(path)
    data = bytearray(st.read_bytes(p))
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    st.write_bytes(p, bytes(data))


def _model_file(path: str) -> str:
    """The file holding model weights in the checkpoint folder `path` (either format)."""
    st, p = storage_for(path)
    names = st.listdir(p)
    name = "model.pt" if "model.pt" in names else next((n for n in names if n.endswith(".distcp")), "model.pt")
    return path.rstrip("/") + "/" + name


class FaultInjector:
    def __init__(self, faults: list[FaultSpec], *, rank: int, run_id: str, stage: str,
                 fired_dir: Path | None = None, gpu: GpuHealth | None = None) -> None:
        self.rank = rank
        self.gpu = gpu
        self.fired_dir = Path(fired_dir) if fired_dir is not None else None
        self._faults = list(enumerate(faults))
        self._run, self._stage = run_id, stage
        # once-faults that fired in this process: they stay active until their window ends
        self._firing: set[int] = set()
        self._fired: set[int] = set()  # once-faults fired by this process (markers cover restarts)
        self._lock = threading.Lock()

    # -- once bookkeeping -------------------------------------------------------------
    def _marker(self, i: int, f: FaultSpec) -> Path | None:
        if self.fired_dir is None:
            return None
        # a data fault hits the batch on every rank: each rank keeps its own marker (a shared one
        # would let the first rank to reach the batch silence the others)
        who = self.rank if f.kind in DATA_FAULTS else f.rank
        key = f"{self._run}|{self._stage}|{i}|{f.kind.value}|{f.at_step}|{who}"
        return self.fired_dir / f"fired-{f.kind.value}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"

    def _has_fired(self, i: int, f: FaultSpec) -> bool:
        if i in self._fired:
            return True
        m = self._marker(i, f)
        return m is not None and m.exists()

    def _mark(self, i: int, f: FaultSpec) -> None:
        self._fired.add(i)
        m = self._marker(i, f)
        if m is not None:
            m.parent.mkdir(parents=True, exist_ok=True)
            m.write_text(f"{time.time()}\n")

    def _should_fire(self, i: int, f: FaultSpec, batch_index: int) -> bool:
        """True while `batch_index` is in the fault's window and the fault may fire."""
        if not (f.at_step <= batch_index < f.at_step + f.duration):
            if i in self._firing and batch_index >= f.at_step + f.duration:
                self._firing.discard(i)  # the window is over; a replay will not re-fire
            return False
        if not f.once:
            return True
        if i in self._firing:
            return True
        if self._has_fired(i, f):
            return False
        # the first batch of the window this run reaches: mark before firing
        # (a crash must not fire again after the restart)
        self._mark(i, f)
        self._firing.add(i)
        return True

    def rewound(self) -> None:
        """The step loop went back in time (rollback): once-faults already fired stay fired."""
        self._firing.clear()

    # -- hooks --------------------------------------------------------------------------
    def before_step(self, batch_index: int, step: int | None = None) -> FaultEffects:
        """Effects for the step about to run. Faults are keyed on the batch index (bad data is
        skippable), except the LR burst, which is keyed on the optimizer step (`step`, 0-based):
        a schedule bug comes back after a rollback however much data is skipped."""
        corrupt = nan = False
        lr_factor = 1.0
        for i, f in self._faults:
            if f.kind == FaultKind.CHECKPOINT_CORRUPT:
                continue
            if f.kind not in DATA_FAULTS and f.rank != self.rank:
                continue
            lr_burst = f.kind == FaultKind.LOSS_SPIKE and f.mode == "lr_burst" and step is not None
            if not self._should_fire(i, f, step if lr_burst else batch_index):
                continue
            if f.kind == FaultKind.WORKER_CRASH:
                os._exit(1)  # the real thing: no cleanup, no exception, the process is gone
            elif f.kind == FaultKind.HANG:
                threading.Event().wait()  # blocks this rank's step loop forever
            elif f.kind == FaultKind.SLOW:
                time.sleep(f.factor or DEFAULT_SLOW_SECONDS)  # the straggler's extra step time
            elif f.kind == FaultKind.NAN:
                nan = True
            elif f.kind == FaultKind.LOSS_SPIKE:
                if f.mode == "lr_burst":
                    lr_factor *= f.factor or DEFAULT_LR_BURST
                else:
                    corrupt = True
            elif f.kind == FaultKind.GPU_XID and self.gpu is not None:
                self.gpu.inject_xid(1)  # one Xid per step of the window
        return FaultEffects(corrupt=corrupt, nan=nan, lr_factor=lr_factor)

    def after_checkpoint(self, path: str, step: int) -> bool:
        """checkpoint_corrupt: flip a byte of the model's file in the first checkpoint written at
        or after `at_step`, after its manifest exists (model.pt, or a DCP checkpoint's first
        shard file). Returns True when it corrupted `path`."""
        if self.rank != 0:
            return False
        with self._lock:
            for i, f in self._faults:
                if f.kind != FaultKind.CHECKPOINT_CORRUPT or step < f.at_step:
                    continue
                if f.once and self._has_fired(i, f):
                    continue
                if f.once:
                    self._mark(i, f)
                elif i in self._firing:
                    continue
                self._firing.add(i)
                corrupt_file(_model_file(path))
                return True
        return False
