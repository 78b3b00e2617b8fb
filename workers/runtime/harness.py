"""The step loop (per rank). See docs/internals.md "Harness step loop".

The harness owns everything around a stage's objective: data cursor and skip list,
backward, gradient all-reduce, clipping, the guard, AdamW and the LR schedule,
checkpoints, metrics, faults and control. Read `Harness.run` top to bottom.
"""
from __future__ import annotations

import contextlib
import collections
import copy
import io
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from trainguard.workers.contract import AnomalyKind, CheckpointRef, CheckpointReport, Control, ControlKind, MetricName, StageKind
from trainguard.workers.runtime.checkpoint import (CheckpointError, CheckpointWriter, Snapshot, WriteResult, checkpoint_format,
                                        checkpoint_path, discard_after, load_checkpoint, stage_root, to_cpu, SIDE_FILES)
from trainguard.workers.runtime.control import ControlInbox
from trainguard.workers.runtime.dcp_store import ShardedCheckpointWriter, TrainState, load_sharded_files
from trainguard.workers.runtime.distributed import Dist, full_state_dicts, is_sharded, load_full_state_dicts, wrap_model
from trainguard.workers.runtime.exporter import CHECKPOINT_STALL, Exporter
from trainguard.workers.runtime.faults import FaultEffects, FaultInjector
from trainguard.workers.runtime.gpu import GpuHealth
from trainguard.workers.runtime.guard import Guard
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.data import local_share, micro_batches, sample_indices
from trainguard.workers.tokenizer import BYTE_TOKENIZER

__all__ = [
    "Harness",
    "StepStart",
    "DataCursor",
    "schedule_lr",
    "anneal_lr",
    "merge_ranges",
    "make_context",
    "metrics_log_path",
    "default_checkpoint_root",
    "autocast_dtype_for",
    "sync_device",
]

# stage kinds that run user code (workers/usercode.py): anything may happen to their weights
USER_CODE_KINDS = frozenset({"custom", "loop"})

PAUSE_POLL_S = 0.1  # paused ranks re-agree ~10x/s so resume/stop apply promptly
REPORTS_KEPT = 1000  # checkpoint reports rank 0 keeps for the supervisor's polls (it polls ~5x/s)
# Retention keeps the healthy checkpoints written up to PROTECT_BEFORE steps before a recent
# anomaly (and at least the newest PROTECT_AT_LEAST of them) for PROTECT_FOR steps after it: the
# supervisor's rollback target must outlive a slow detection when steps are fast and keep_last small.
PROTECT_BEFORE = 200
PROTECT_AT_LEAST = 3
PROTECT_FOR = 500


# -- pure pieces ----------------------------------------------------------------------------
def schedule_lr(step: int, *, base: float, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `base` to `base * min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def anneal_lr(step: int, ov: dict[str, Any]) -> float:
    """The anneal override: from `start_lr` at `start_step` to `final_lr` over `steps`, then hold."""
    t = min(max((step - ov["start_step"]) / max(1, ov["steps"]), 0.0), 1.0)
    a, b = float(ov["start_lr"]), float(ov["final_lr"])
    kind = ov.get("schedule", "linear")
    if kind == "cosine":
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "exponential" and a > 0 and b > 0:
        return a * (b / a) ** t
    return a + (b - a) * t


def merge_ranges(ranges: Iterable[Iterable[int]]) -> list[list[int]]:
    """Sorted, merged half-open [start, end) ranges; empty ones dropped."""
    rs = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
    out: list[list[int]] = []
    for a, b in rs:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


@dataclass
class DataCursor:
    """`next_index` is the next batch index to consider; `skip` ranges are never trained on."""

    next_index: int = 0
    skip: list[list[int]] = field(default_factory=list)

    def add_skip(self, ranges: Iterable[Iterable[int]]) -> None:
        self.skip = merge_ranges([*self.skip, *ranges])

    def take(self) -> int:
        idx = self.next_index
        for a, b in self.skip:  # sorted and merged: one pass suffices
            if a <= idx < b:
                idx = b
        self.next_index = idx + 1
        return idx


def metrics_log_path(state_dir: Path, run_id: str, stage: str, rank: int) -> Path:
    return Path(state_dir) / "runs" / run_id / stage / f"metrics-rank{rank}.jsonl"


def default_checkpoint_root(state_dir: Path) -> str:
    return str(Path(state_dir) / "checkpoints")


def autocast_dtype_for(device: torch.device, native_bf16: Callable[[torch.device], bool]) -> torch.dtype | None:
    """bf16 autocast on a CUDA GPU that has bf16 in hardware (compute capability >= 8.0),
    no autocast (fp32) everywhere else. `torch.cuda.is_bf16_supported()` also says yes where
    bf16 is only emulated (V100, T4: slow); those GPUs train in fp32. fp16 there would need
    a GradScaler, whose overflow-and-skip steps the guard would count as non-finite
    gradients (rollbacks), and its scale in every checkpoint for an exact resume."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if native_bf16(device) else None


def _native_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):  # is_bf16_supported asks about the current device
        return torch.cuda.is_bf16_supported(including_emulation=False)


def sync_device(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (CUDA kernels run asynchronously, so a
    clock read right after `backward()` measures only the launches); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_context(spec: Any, stage_name: str, *, run_id: str, rank: int = 0, world_size: int = 1,
                 inputs: dict[str, CheckpointRef] | None = None, device: torch.device | None = None,
                 state_dir: Path | str | None = None) -> StageContext:
    """The StageContext for `stage_name` of pipeline `spec` (init checkpoint from `inputs`:
    earlier stages' outputs, each with the hashes recorded when it was reported).
    `device` defaults to the current CUDA device when there is one (a process outside Ray);
    a Ray worker passes the device of the GPU Ray assigned it, or the CPU
    (workers/runtime/distributed.py `rank_device`).
    The tokenizer is the byte one, or for a Hugging Face model (`spec.model.hf`) the model
    folder's / the run's trained BPE, kept under `state_dir` (workers/hf.py `stage_tokenizer`)."""
    st = spec.stage(stage_name)
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    autocast = autocast_dtype_for(device, _native_bf16)
    inputs = dict(inputs or {})
    init = None
    if st.kind in (StageKind.CUSTOM.value, StageKind.LOOP.value):
        # user code defines its own model: it starts from an earlier stage only when told to
        init = inputs.get(st.init_from) if st.init_from is not None else None
    elif st.kind != StageKind.PRETRAIN.value:
        names = [s.name for s in spec.stages]
        i = names.index(stage_name)
        src = st.init_from or (names[i - 1] if i > 0 else None)
        init = inputs.get(src) if src is not None else None
    return StageContext(run_id=run_id, rank=rank, world_size=world_size, seed=spec.seed, device=device,
                        autocast_dtype=autocast, model_spec=spec.model, stage=st, inputs=inputs,
                        init_checkpoint=init, data_files=dict(spec.data), tokenizer=_stage_tokenizer(spec, run_id, state_dir))


def _load_pt(data: bytes) -> Any:
    """A verified side file of a DCP checkpoint, onto the CPU (RNG states must stay CPU tensors)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _stage_tokenizer(spec: Any, run_id: str, state_dir: Path | str | None) -> Any:
    if getattr(spec.model, "hf", None) is None:
        return BYTE_TOKENIZER
    from trainguard.workers.hf import stage_tokenizer  # transformers only for an HF model

    return stage_tokenizer(spec.model, dict(spec.data), run_id, state_dir)


def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG as tensors and plain values, so rng.pt loads with `weights_only=True`; the
    CUDA generator of this rank's `device` only (as a one-element list), never of GPUs the
    process merely sees (reading those would create a context on them)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device is not None and device.type == "cuda":
        st["cuda"] = [torch.cuda.get_rng_state(device)]
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device | None = None) -> None:
    """`st` as loaded onto the CPU: the generators take CPU byte tensors only."""
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in st and device is not None and device.type == "cuda":
        cuda = st["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda, device)


@dataclass
class MemoryCopy:
    """A checkpoint's training state as this rank staged it, kept in host memory for a rollback
    (`Harness.rollback`): what loading the checkpoint's files would give this rank."""

    step: int  # rank 0 writes the same checkpoint to checkpoint_path(root, run, stage, step)
    model: dict[str, Any]  # in the writer's staging buffers (complete once `writer.wait_staging()` returned)
    optimizer: dict[str, Any]
    extra: Any
    rng: dict[str, Any]  # this rank's (the checkpoint's rng.pt holds every rank's)
    state: dict[str, Any]


@dataclass(frozen=True)
class StepStart:
    """A step under way (Harness.begin_step): when it began, which batch, what the faults do, the LR."""

    t0: float
    step: int
    batch_index: int
    effects: FaultEffects
    lr: float


class Harness:
    """One rank's training loop for one stage.

    `run()` returns {"state": finished|stopped, "step", "output_checkpoint", "last_checkpoint"}.
    `on_step(harness)` runs after every step (tests use it to inject controls at exact steps).
    """

    def __init__(self, stage: Stage, *, spec: Any, stage_name: str, run_id: str, state_dir: Path,
                 dist: Dist | None = None, exporter: Exporter | None = None, inbox: ControlInbox | None = None,
                 resume_from: CheckpointRef | None = None, skip: Iterable[Iterable[int]] = (),
                 lr_multiplier: float | None = None, fired_dir: Path | None = None, gpu: GpuHealth | None = None,
                 checkpoint_root: str | None = None, health_window: int = 10,
                 on_step: Callable[["Harness"], None] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        """`optimizer`: the loop API's (the user's own, over `stage.model`'s parameters); default
        AdamW with decoupled weight decay on the matrices."""
        self.stage = stage
        self.spec = spec
        self.sspec = spec.stage(stage_name)
        self.stage_name = stage_name
        self.run_id = run_id
        self.state_dir = Path(state_dir)
        self.dist = dist or Dist(rank=stage.ctx.rank, world_size=stage.ctx.world_size, device=stage.ctx.device)
        self.rank = self.dist.rank
        self.exporter = exporter or Exporter(run_id, stage_name, self.rank, gpu=gpu)
        self.inbox = inbox or ControlInbox()
        self.faults = FaultInjector(self.sspec.faults, rank=self.rank, run_id=run_id, stage=stage_name,
                                    fired_dir=fired_dir, gpu=gpu)
        self.guard = Guard()
        self.health_window = health_window
        self.on_step = on_step
        ck = spec.checkpoint_for(self.sspec)
        self.ckpt_every = ck.every
        root = checkpoint_root or ck.storage or default_checkpoint_root(self.state_dir)
        self._ckpt_group: Any = None  # the DCP traffic's process group (`_checkpoint_group`)
        self.ckpt_format = spec.checkpoint_format(self.sspec)
        self.writer: CheckpointWriter | ShardedCheckpointWriter
        if self.ckpt_format == "dcp":
            self.writer = ShardedCheckpointWriter(root, rank=self.rank, process_group=self._checkpoint_group(),
                                                  asynchronous=ck.asynchronous, keep_last=ck.keep_last,
                                                  on_written=self._on_written)
        else:
            self.writer = CheckpointWriter(root, asynchronous=ck.asynchronous, keep_last=ck.keep_last,
                                           on_written=self._on_written)
        # host-memory copies of the newest checkpoints for rollbacks, by slot (`_keeps_memory`)
        self.in_memory = ck.in_memory
        self._memory: dict[int, MemoryCopy] = {}

        # `parallel.strategy` (none|ddp|fsdp): wrapped in place, before the optimizer sees the
        # parameters (FSDP2 turns them into sharded DTensors); the stage keeps its own `model`
        self.parallel = str(getattr(getattr(self.sspec, "parallel", None), "strategy", "none"))
        model = wrap_model(stage.model, self.parallel, self.dist, param_dtype=stage.ctx.autocast_dtype)
        # DDP / FSDP2 average the gradients during backward; otherwise one flat all-reduce after it
        self.grads_averaged_in_backward = self.parallel != "none" and self.dist.enabled
        # FSDP2: checkpoints gather full state dicts, loads scatter them
        self.sharded = self.grads_averaged_in_backward and is_sharded(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if optimizer is None:
            decay = [p for p in self.params if p.dim() >= 2]
            no_decay = [p for p in self.params if p.dim() < 2]
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": self.sspec.weight_decay},
                 {"params": no_decay, "weight_decay": 0.0}],
                lr=self.sspec.lr, betas=(0.9, 0.95))
        self.optimizer = optimizer
        # the schedule sets every group's LR; a user's group keeps its ratio to the stage's `lr`
        self._lr_scales = [float(g["lr"]) / self.sspec.lr for g in self.optimizer.param_groups]
        self.n_params = sum(p.numel() for p in self.params)

        # training state (all of it goes into the checkpoint)
        self.step = 0
        self.cursor = DataCursor()
        self.lr_multiplier = 1.0
        self.anneal: dict[str, Any] | None = None
        self.mixture: dict[str, float] | None = None  # override from an anneal control
        self.best_metric: float | None = None
        self.best_path: str | None = None
        self.tokens_seen = 0  # all ranks
        if self.sspec.kind == StageKind.ANNEAL.value:
            self.anneal = {"start_step": 0, "start_lr": self.sspec.lr, "final_lr": self.sspec.final_lr,
                           "steps": self.sspec.steps, "schedule": self.sspec.schedule}

        # bookkeeping (not checkpointed)
        self.state = "starting"
        self.paused = False
        self.stopped = False
        self.last_loss = float("nan")
        self.last_grad_norm = float("nan")
        self.last_spike = 0.0
        self.last_applied = True  # whether the last step's update reached the weights (the guard's verdict)
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.anomaly_steps: list[int] = []
        self.last_checkpoint: str | None = None
        self.final_checkpoint: str | None = None
        # rank 0's reports of what it wrote (the supervisor polls them), and the references of
        # its own checkpoints, which it may load back without the supervisor (tests, tools)
        self.reports: collections.deque[CheckpointReport] = collections.deque(maxlen=REPORTS_KEPT)
        self.own: dict[str, CheckpointRef] = {}
        self._healthy_written: list[int] = []  # steps of the healthy checkpoints rank 0 wrote
        # the incident ids of the ROLLBACK controls applied: a supervisor learns from the result
        # whether a rollback it sent took effect before the loop ended
        self.rollbacks_applied: list[int] = []
        self._written_lock = threading.Lock()
        self._log = None

        if resume_from is not None:
            self.load(self.ref_of(resume_from))
            self._discard_abandoned()
        self.cursor.add_skip(skip)
        if lr_multiplier is not None:
            self.lr_multiplier = float(lr_multiplier)
        self.exporter.set(MetricName.MODEL_PARAMETERS, self.n_params)
        self.exporter.set(MetricName.STEP, self.step)

    # -- LR ------------------------------------------------------------------------------------
    def _base_lr(self, step: int) -> float:
        """LR before the multiplier: the anneal override when set, else warmup+cosine."""
        if self.anneal is not None and step >= self.anneal["start_step"]:
            return anneal_lr(step, self.anneal)
        s = self.sspec
        return schedule_lr(step, base=s.lr, total=s.steps, warmup=s.warmup_steps, min_ratio=s.min_lr_ratio)

    def lr_at(self, step: int) -> float:
        return self._base_lr(step) * self.lr_multiplier

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with self.session():
            while self.next_step():
                self.end_step(self._train_step())
        return self.result()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The frame of a stage's training: the metrics log open, and on a normal exit the last
        evaluation and the final checkpoint (unless stopped). The loop API (workers/runtime/loop.py)
        runs its user's loop inside one, as `run` runs the built-in one."""
        log_path = metrics_log_path(self.state_dir, self.run_id, self.stage_name, self.rank)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", buffering=1)
        self.state = "running"
        try:
            yield
            if not self.stopped:
                self._evaluate()
                self._checkpoint(final=True)
                self.writer.wait()
                self.state = "finished"
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self._log.close()

    def next_step(self) -> bool:
        """Whether another step is to be trained: steps remain, and the control messages all ranks
        agree on (applied here, at the step boundary: pause blocks, rollback reloads) did not stop it."""
        return self.step < self.sspec.steps and self._boundary()

    def end_step(self, rec: dict[str, Any]) -> None:
        """After a step: evaluate when due, publish its record, checkpoint when due."""
        if self._eval_due():
            rec.update(self._evaluate())
        self._finish_step(rec)
        if self.on_step is not None:
            self.on_step(self)
        if self.step % self.ckpt_every == 0 and self.step < self.sspec.steps:
            self._checkpoint()

    def result(self) -> dict[str, Any]:
        return {"state": self.state, "step": self.step, "output_checkpoint": self.output_checkpoint(),
                "last_checkpoint": self.last_checkpoint, "checkpoints": self.reports_since(-1),
                "rollbacks_applied": list(self.rollbacks_applied)}

    def status(self, since: int = -1) -> dict[str, Any]:
        """`checkpoints`: the reports (as dicts) with seq > `since`."""
        return {"rank": self.rank, "step": self.step, "state": "paused" if self.paused and self.state == "running"
                else self.state, "output_checkpoint": self.output_checkpoint(),
                "last_checkpoint": self.last_checkpoint, "checkpoints": self.reports_since(since)}

    def reports_since(self, since: int) -> list[dict[str, Any]]:
        with self._written_lock:
            return [r.to_dict() for r in self.reports if r.seq > since]

    def ref_of(self, checkpoint: CheckpointRef | dict[str, Any] | str | Path) -> CheckpointRef:
        """A reference to load: given as one (the supervisor's, from its store), or the path of
        a checkpoint this harness wrote itself. Any other path is refused: its hashes would come
        from the folder it is meant to check."""
        if isinstance(checkpoint, CheckpointRef):
            return checkpoint
        if isinstance(checkpoint, dict):
            return CheckpointRef.from_dict(checkpoint)
        with self._written_lock:
            ref = self.own.get(str(checkpoint))
        if ref is None:
            raise CheckpointError(f"{checkpoint}: no recorded hashes (not reported by a worker); refusing to load")
        return ref

    def output_checkpoint(self) -> str | None:
        if self.state != "finished":
            return None
        if self.stage.output_metric() is not None and self.best_path is not None:
            return self.best_path
        return self.final_checkpoint

    def _boundary(self) -> bool:
        """Apply the control messages all ranks agree on; stay here while paused.
        Returns False when the loop must end (stop)."""
        self._apply(self.inbox.agree(self.dist.min_int))
        while self.paused and not self.stopped:
            self.exporter.set(MetricName.WORKER_PAUSED, 1)
            time.sleep(PAUSE_POLL_S)  # pacing of the agreement rounds, not synchronisation
            self._apply(self.inbox.agree(self.dist.min_int))
        self.exporter.set(MetricName.WORKER_PAUSED, 0)
        if self.stopped:
            self._checkpoint(sync=True)
            self.state = "stopped"
            return False
        return True

    def _apply(self, msgs: list[Control]) -> None:
        for m in msgs:
            p = m.payload
            if m.kind == ControlKind.PAUSE:
                self.paused = True
            elif m.kind == ControlKind.RESUME:
                self.paused = False
            elif m.kind == ControlKind.STOP:
                self.stopped = True
            elif m.kind == ControlKind.LR_MULTIPLIER:
                self.lr_multiplier = float(p["value"])
            elif m.kind == ControlKind.ANNEAL:
                self._start_anneal(int(p["steps"]), float(p["final_lr"]), p.get("schedule", "linear"), p.get("mixture"))
            elif m.kind == ControlKind.ROLLBACK:
                self.rollback(p["checkpoint"], p.get("skip") or [], p.get("lr_multiplier"))
                if p.get("incident") is not None:
                    self.rollbacks_applied.append(int(p["incident"]))

    def _start_anneal(self, steps: int, final_lr: float, schedule: str, mixture: dict[str, float] | None) -> None:
        # stored without the multiplier, so a later lr_multiplier still scales the anneal
        m = self.lr_multiplier if self.lr_multiplier > 0 else 1.0
        self.anneal = {"start_step": self.step, "start_lr": self._base_lr(self.step), "final_lr": final_lr / m,
                       "steps": max(1, steps), "schedule": schedule}
        if mixture:
            self.mixture = dict(mixture)

    def rollback(self, checkpoint: CheckpointRef | dict[str, Any] | str | Path, skip: Iterable[Iterable[int]],
                 lr_multiplier: float | None) -> None:
        """In-process rollback: load (verified against the recorded hashes), add skip ranges,
        set the LR multiplier."""
        keep_skip, keep_mult = list(self.cursor.skip), self.lr_multiplier
        ref = self.ref_of(checkpoint)
        # rank 0's background write (and its retention) must finish before any rank reads, and
        # every rank's staging copies before one is restored
        self.writer.wait()
        mem = self._memory_copy(ref)
        # collective (every rank past its wait): from memory only if every rank holds the copy
        if self.dist.min_int(int(mem is not None)) == 1:
            assert mem is not None
            self._restore(self._from_memory(mem))
        else:
            self.load(ref)
        self._memory = {slot: m for slot, m in self._memory.items() if m.step <= self.step}
        self._discard_abandoned()
        self.cursor.add_skip([*keep_skip, *skip])
        self.lr_multiplier = keep_mult if lr_multiplier is None else float(lr_multiplier)
        self.anomaly_steps = [s for s in self.anomaly_steps if s <= self.step]
        with self._written_lock:
            self._healthy_written = [c for c in self._healthy_written if c <= self.step]
        self.faults.rewound()
        self.exporter.set(MetricName.STEP, self.step)

    def _memory_copy(self, ref: CheckpointRef) -> MemoryCopy | None:
        """This rank's copy of the checkpoint `ref` names, if it holds one. Rank 0 also checks that
        `ref` names what it wrote (the same hashes): a path alone could name a checkpoint of an
        abandoned timeline, and the other ranks go by rank 0's answer (`rollback`)."""
        m = next((m for m in self._memory.values()
                  if checkpoint_path(self.writer.root, self.run_id, self.stage_name, m.step) == ref.path), None)
        if m is not None and self.rank == 0:
            with self._written_lock:
                own = self.own.get(ref.path)
            if own is None or own.files != ref.files:
                return None
        return m

    def _from_memory(self, m: MemoryCopy) -> dict[str, Any]:
        """What `load_checkpoint` would give for `m`'s checkpoint, from memory. The model's state is
        copied into the parameters by `load_state_dict`; everything else is copied here, since
        the optimizer and the stage would otherwise keep (and change) the kept copy's tensors."""
        return {"model": m.model, "optimizer": copy.deepcopy(m.optimizer), "extra": copy.deepcopy(m.extra),
                "rng": {self.rank: copy.deepcopy(m.rng)}, "state": copy.deepcopy(m.state)}

    def _discard_abandoned(self) -> None:
        if self.rank == 0:
            discard_after(stage_root(self.writer.root, self.run_id, self.stage_name), self.step)

    def begin_step(self) -> "StepStart":
        """Take the next batch index (past the skip list), let the faults act on it, set the LR and
        clear the gradients: what comes before a step's forward passes."""
        t0 = time.perf_counter()
        batch_index = self.cursor.take()
        effects = self.faults.before_step(batch_index, step=self.step)
        lr = self.lr_at(self.step) * effects.lr_factor
        for g, scale in zip(self.optimizer.param_groups, self._lr_scales):
            g["lr"] = lr if scale == 1.0 else lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        return StepStart(t0=t0, step=self.step, batch_index=batch_index, effects=effects, lr=lr)

    def _train_step(self) -> dict[str, Any]:
        start = self.begin_step()
        step, batch_index, effects = start.step, start.batch_index, start.effects
        mixture = self.mixture or dict(self.sspec.mixture)
        ctx = self.stage.ctx
        autocast = (torch.autocast(device_type=ctx.device.type, dtype=ctx.autocast_dtype)
                    if ctx.autocast_dtype is not None else contextlib.nullcontext())
        micro = self._micro_steps(batch_index)
        if micro is None:  # one forward/backward over this rank's whole share
            with autocast:
                result = self.stage.step(batch_index, step, mixture, corrupt=effects.corrupt)
            loss = result.loss.float()
            if effects.nan:
                loss = loss * float("nan")  # the NaN flows into every gradient, as a real one would
            loss_value = float(loss.detach())
            loss.backward()
        else:  # gradient accumulation: micro-steps over the share, each weighted by its size
            share, parts = micro
            loss_value, tokens, last = 0.0, 0, None
            for samples in parts:
                with autocast:
                    last = self.stage.step(batch_index, step, mixture, corrupt=effects.corrupt, samples=samples)
                loss = last.loss.float() * (len(samples) / len(share))
                if effects.nan:
                    loss = loss * float("nan")
                loss_value += float(loss.detach())
                tokens += last.tokens
                loss.backward()
            assert last is not None
            result = StepResult(loss=torch.tensor(loss_value), tokens=tokens, metrics=last.metrics)
        return self.complete_step(start, loss_value, result)

    def complete_step(self, start: "StepStart", loss_value: float, result: StepResult) -> dict[str, Any]:
        """After this rank's backward: average the gradients, clip, let the guard decide, step the
        optimizer (or not), publish. Returns the step's history record (for `end_step`)."""
        ctx = self.stage.ctx
        # this rank's own work, before it waits for the others in the all-reduce: a straggler
        # shows here, while the wall-clock step time is the same on every rank. On CUDA the
        # backward is still queued when backward() returns: wait for it before reading the clock.
        # With parallel ddp/fsdp the collectives run inside forward/backward, so this includes
        # the wait for the slowest rank: those strategies give the straggler detector no signal.
        sync_device(ctx.device)
        compute = time.perf_counter() - start.t0
        local_nonfinite = 0.0 if math.isfinite(loss_value) else 1.0
        if self.grads_averaged_in_backward:  # DDP / FSDP2 did the averaging; the vote is its own all-reduce
            nonfinite_votes = self.dist.sum_float(local_nonfinite)
        else:
            nonfinite_votes = self.dist.all_reduce_grads(self.params, local_nonfinite)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.sspec.grad_clip))
        # the guard decides before the optimizer: a non-finite step never reaches the weights
        verdict = self.guard.check(loss_value, grad_norm, any_rank_nonfinite=nonfinite_votes > 0)
        self.last_applied = verdict.apply_update
        if verdict.apply_update:
            self.optimizer.step()
            self.stage.after_step(result, start.step)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.sspec.step_delay:
            time.sleep(self.sspec.step_delay)  # demo pacing
        self.step = start.step + 1
        self.tokens_seen += result.tokens * self.dist.world_size
        seconds = time.perf_counter() - start.t0
        self.last_loss, self.last_grad_norm, self.last_spike = loss_value, grad_norm, verdict.spike_score
        if verdict.anomaly is not None:
            self.anomaly_steps.append(self.step)
            self.exporter.count_anomaly(verdict.anomaly)
        rec = self._publish(start.batch_index, start.lr, seconds, result.tokens, result.metrics, verdict.anomaly)
        rec["compute_seconds"] = compute
        return rec

    def sample_range(self, batch_index: int) -> list[int]:
        """[first, end) of the global sample indices this rank trains on in batch `batch_index`."""
        lo, hi = local_share(self.rank, self.dist.world_size, self.sspec.batch_size)
        base = batch_index * self.sspec.batch_size
        return [base + lo, base + hi]

    def _micro_steps(self, batch_index: int) -> tuple[list[int], list[list[int]]] | None:
        """(this rank's share of global batch `batch_index`, its micro-batches) when the stage
        accumulates gradients (`micro_batch_size` below the share), else None."""
        size = self.sspec.micro_batch_size
        if size is None:
            return None
        share = sample_indices(batch_index, self.rank, self.dist.world_size, self.sspec.batch_size)
        return (share, micro_batches(share, size)) if size < len(share) else None

    def _eval_due(self) -> bool:
        s = self.step
        return (s % self.sspec.eval_every == 0 or s == self.sspec.steps
                # stages that output their best checkpoint evaluate every checkpoint
                or (self.stage.output_metric() is not None and s % self.ckpt_every == 0))

    def _publish(self, batch_index: int, lr: float, seconds: float, tokens: int, metrics: dict[str, float],
                 anomaly: AnomalyKind | None) -> dict[str, Any]:
        """Gauges now; the history record is returned for eval metrics to join it."""
        e = self.exporter
        e.set(MetricName.STEP, self.step)
        e.set(MetricName.TRAIN_LOSS, self.last_loss)
        e.set(MetricName.GRAD_NORM, self.last_grad_norm)
        e.set(MetricName.LEARNING_RATE, lr)
        e.set(MetricName.SPIKE_SCORE, self.last_spike)
        e.set(MetricName.TOKENS_PER_PARAMETER, self.tokens_seen / max(1, self.n_params))
        e.set_stage_metrics(metrics)
        e.observe_step(seconds, tokens)
        rec: dict[str, Any] = {"step": self.step, "batch_index": batch_index, "time": time.time(),
                               "loss": self.last_loss, "grad_norm": self.last_grad_norm, "lr": lr,
                               "spike_score": self.last_spike, "anomaly": anomaly.value if anomaly else None,
                               "step_seconds": seconds, "rank": self.rank}
        rec.update({k: float(v) for k, v in metrics.items() if v is not None})
        return rec

    def _finish_step(self, rec: dict[str, Any]) -> None:
        text = self.exporter.record_json(rec)  # the record's JSON, as /history serves it
        if self._log is not None:
            # the log also names the global samples this rank trained on (a pure function of the
            # batch index; written out so a reader needs no trainguard to check what was trained):
            # json.dumps({**rec, "samples": ...}), from the record's JSON text
            samples = self.sample_range(rec["batch_index"])
            if "samples" in rec:
                self._log.write(json.dumps({**rec, "samples": samples}) + "\n")
            else:
                self._log.write(f'{text[:-1]}, "samples": {json.dumps(samples)}}}\n')
        # the heartbeat goes last: a step counts as finished once its record is out
        self.exporter.set(MetricName.LAST_STEP_TS, time.time())

    def _evaluate(self) -> dict[str, float]:
        if self.last_eval_step == self.step:
            return dict(self.last_eval)
        model = self.stage.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.stage.evaluate()
        finally:
            model.train(was_training)
        self.last_eval = {k: float(v) for k, v in metrics.items()}
        self.last_eval_step = self.step
        self.exporter.set_stage_metrics(self.last_eval)
        return dict(self.last_eval)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, final: bool = False, sync: bool = False) -> None:
        t0 = time.perf_counter()
        tags: list[str] = ["final"] if final else []
        metric = self.stage.output_metric()
        if metric is not None:
            self._evaluate()  # the best checkpoint is picked on weights that were evaluated
            value = self.last_eval.get(metric)
            if value is not None and math.isfinite(value) and (self.best_metric is None or value < self.best_metric):
                self.best_metric = value
                tags.append("best")
        rng = {**_rng_state(self.stage.ctx.device), "guard": self.guard.state()}
        gathered = self.dist.gather_to_rank0(rng)  # collective: every rank checkpoints at the same step
        dcp = isinstance(self.writer, ShardedCheckpointWriter)
        # torch format under FSDP2: the full model and optimizer state, gathered onto rank 0's CPU
        # (collective); DCP: every rank writes its own shards below
        full = full_state_dicts(self.stage.model, self.optimizer) if self.sharded and not dcp else None
        keep = self._keeps_memory()
        slot = self._memory_slot() if keep else None
        state = self._state_dict()
        if "best" in tags:  # this checkpoint becomes the best one once it lands
            state["best_path"] = checkpoint_path(self.writer.root, self.run_id, self.stage_name, self.step)
        if self.rank != 0:
            if dcp:  # only rank 0's description of the checkpoint is written
                snap = Snapshot(run=self.run_id, stage=self.stage_name, stage_kind=self.sspec.kind, step=self.step,
                                batch_cursor=self.cursor.next_index, model={}, optimizer={}, extra={}, rng={}, state={})
                self.writer.submit(snap, frozenset(), self._train_state())
                if sync or final:
                    self.writer.wait()
            elif slot is not None:  # the same state as rank 0's (replicated), for a rollback
                self._remember(slot, *self._stage_state(slot), extra={}, rng=rng, state=state)
                self.writer.copy_staged()  # in the writer thread, as rank 0's copy for its write
            return
        window_lo = self.step - self.health_window
        anomalies = sum(1 for s in self.anomaly_steps if window_lo < s <= self.step)
        metrics = {"train_loss": self.last_loss, "grad_norm": self.last_grad_norm, "spike_score": self.last_spike}
        if "val_loss" in self.last_eval:
            metrics["val_loss"] = self.last_eval["val_loss"]
        if metric is not None and metric in self.last_eval:
            metrics[metric] = self.last_eval[metric]
        if dcp:
            model_sd: dict[str, Any] = {}
            optim_sd: dict[str, Any] = {}
        elif full is not None:
            model_sd, optim_sd = full
        else:
            model_sd, optim_sd = self._stage_state(slot)
        extra = to_cpu(self.stage.extra_state())
        if slot is not None:
            self._remember(slot, model_sd, optim_sd, extra=extra, rng=rng, state=state)
        snap = Snapshot(
            run=self.run_id, stage=self.stage_name, stage_kind=self.sspec.kind, step=self.step,
            batch_cursor=self.cursor.next_index, model=model_sd, optimizer=optim_sd,
            extra=extra, rng={r: s for r, s in enumerate(gathered or [])},
            state=state, metrics=metrics,
            healthy=anomalies == 0 and all(math.isfinite(v) for v in metrics.values()),
            anomalies_in_window=anomalies, model_config=self.spec.model.model_dump(), tags=tags)
        # waits only if the previous write still runs
        if dcp:
            self.writer.submit(snap, self.retention_protect(), self._train_state())
        else:
            self.writer.submit(snap, self.retention_protect())
        if sync or final:
            self.writer.wait()
        self.exporter.set(CHECKPOINT_STALL, time.perf_counter() - t0)

    def _stage_state(self, slot: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and optimizer's state in the writer's reused CPU buffers (those of memory
        slot `slot` when kept for rollbacks). For the built-in stages the copy runs in the writer
        thread beside the next forward/backward, and the optimizer's next step waits for it:
        nothing else changes them in place before (`rollback` and `load` wait for the writer
        first). User code (custom stages, own loops) may change parameters in place outside the
        optimizer (a clamp, a weight-tying fix-up): its copy is made here, before the step loop
        goes on."""
        assert isinstance(self.writer, CheckpointWriter)
        until = None if self.sspec.kind in USER_CODE_KINDS else self.optimizer
        suffix = "" if slot is None else f".{slot}"
        return (self.writer.stage("model" + suffix, self.stage.model.state_dict(), until=until),
                self.writer.stage("optimizer" + suffix, self.optimizer.state_dict(), until=until))

    def _keeps_memory(self) -> bool:
        """Whether this checkpoint's state stays in host memory for a rollback (`in_memory` > 0):
        only where every rank holds what loading the files would give it — the torch format,
        unsharded, and, with several ranks, a stage without extra state (the files hold rank 0's,
        which all ranks load)."""
        return (self.in_memory > 0 and not isinstance(self.writer, ShardedCheckpointWriter) and not self.sharded
                and (self.dist.world_size == 1 or type(self.stage).extra_state is Stage.extra_state))

    def _memory_slot(self) -> int:
        """The slot the next copy takes (a free one, else the oldest copy's), emptied: its buffers
        are about to be refilled."""
        free = [i for i in range(self.in_memory) if i not in self._memory]
        slot = free[0] if free else min(self._memory, key=lambda i: self._memory[i].step)
        self._memory.pop(slot, None)
        return slot

    def _remember(self, slot: int, model: dict[str, Any], optimizer: dict[str, Any], *, extra: Any,
                  rng: dict[str, Any], state: dict[str, Any]) -> None:
        self._memory[slot] = MemoryCopy(step=self.step, model=model, optimizer=optimizer, extra=extra, rng=rng,
                                        state=copy.deepcopy(state))

    def _checkpoint_group(self) -> Any:
        """DCP saves and loads run on a gloo group of their own: an async save's collectives run
        in a background thread and must not interleave with the training's (dcp_store). Made on
        first use (collective: every rank gets here at the same point — the harness's set-up of a
        DCP stage, or a load of a DCP checkpoint), so a torch-format stage never pays for it;
        None at world size 1."""
        if self._ckpt_group is None:
            self._ckpt_group = self.dist.new_group("gloo")
        return self._ckpt_group

    def _train_state(self) -> dict[str, Any]:
        """What a DCP checkpoint holds besides `Snapshot`'s other files: model and optimizer, sharded."""
        return {"train": TrainState(self.stage.model, self.optimizer)}

    def retention_protect(self) -> frozenset[int]:
        """Steps of the healthy checkpoints written before the first anomaly of the last
        PROTECT_FOR steps, which the supervisor may roll back to (see PROTECT_BEFORE)."""
        recent = [s for s in self.anomaly_steps if self.step - s <= PROTECT_FOR]
        if not recent:
            return frozenset()
        first = min(recent)
        with self._written_lock:
            before = sorted(c for c in self._healthy_written if c < first)
        return frozenset({c for c in before if c >= first - PROTECT_BEFORE} | set(before[-PROTECT_AT_LEAST:]))

    def _on_written(self, res: WriteResult) -> None:
        """Writer thread: the checkpoint is in place (manifest last) and retention ran.
        The report carries the hashes of the bytes as written, before any fault touches them."""
        self.exporter.observe_checkpoint(res.step, res.seconds, res.bytes)
        with self._written_lock:
            seq = self.reports[-1].seq + 1 if self.reports else 0
            self.reports.append(CheckpointReport(
                seq=seq, ref=res.ref, step=res.step, batch_cursor=int(res.manifest["batch_cursor"]),
                healthy=bool(res.manifest["healthy"]), metrics=dict(res.manifest["metrics"]), tags=res.tags))
            self.own.pop(res.path, None)  # re-inserted as the newest
            self.own[res.path] = res.ref
            if "best" in res.tags:
                self.best_path = res.path
            # bounded like the reports: the oldest go first, the best (the stage's output) stays
            for old in [p for p in self.own if p != self.best_path][:max(0, len(self.own) - REPORTS_KEPT)]:
                del self.own[old]
            if res.manifest["healthy"]:
                self._healthy_written.append(res.step)
            self.last_checkpoint = res.path
            if "final" in res.tags:
                self.final_checkpoint = res.path
        self.faults.after_checkpoint(res.path, res.step)

    def _state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batch_cursor": self.cursor.next_index, "skip": self.cursor.skip,
                "lr_multiplier": self.lr_multiplier, "anneal": self.anneal, "mixture": self.mixture,
                "best_metric": self.best_metric, "best_path": self.best_path, "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size}

    def load(self, ref: CheckpointRef) -> None:
        """Restore the full training state from a checkpoint (bytes verified against `ref` first)."""
        self.writer.wait_staging()  # a checkpoint's copy of the weights may still be being made
        if checkpoint_format(ref) == "dcp":  # collective: each rank reads its shards (resharded by DCP)
            _, blobs = load_sharded_files(ref, self._train_state(), SIDE_FILES,
                                          process_group=self._checkpoint_group())
            ck = {"extra": _load_pt(blobs["extra.pt"]), "rng": _load_pt(blobs["rng.pt"]),
                  "state": json.loads(blobs["state.json"])}
        else:
            # onto the CPU: the RNG states must stay CPU byte tensors; load_state_dict copies the
            # weights into the parameters wherever they are, and the optimizer moves its state
            # to each parameter's device — all but AdamW's `step`, which stays on the CPU
            # (torch.optim.Optimizer.load_state_dict, capturable=False and fused=False)
            ck = load_checkpoint(ref, map_location="cpu")
            if self.sharded:  # collective: each rank keeps its shard of the full state
                load_full_state_dicts(self.stage.model, self.optimizer, ck["model"], ck["optimizer"])
                ck = {k: v for k, v in ck.items() if k not in ("model", "optimizer")}
        self._restore(ck)

    def _restore(self, ck: dict[str, Any]) -> None:
        """Set the training state from a loaded checkpoint: {"model", "optimizer" (both absent when
        already loaded), "extra", "rng" (by rank), "state"}."""
        if "model" in ck:
            self.stage.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        self.stage.load_extra_state(ck["extra"])
        st = ck["state"]
        self.step = int(st["step"])
        self.cursor = DataCursor(int(st["batch_cursor"]), merge_ranges(st.get("skip", [])))
        self.lr_multiplier = float(st.get("lr_multiplier", 1.0))
        self.anneal = st.get("anneal")
        self.mixture = st.get("mixture")
        self.best_metric = st.get("best_metric")
        self.best_path = st.get("best_path")
        self.tokens_seen = int(st.get("tokens_seen", 0))
        rng = ck["rng"].get(self.rank, ck["rng"].get(0))
        if rng is not None:
            _set_rng_state(rng, self.stage.ctx.device)
            self.guard.load_state(rng.get("guard", {}))
        self.last_eval_step = -1
