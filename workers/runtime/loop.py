"""The loop API, version 1: trainguard's guard around a training loop the user owns
(`kind: loop`, `entrypoint: package.module:function`; docs/user-code.md).

The workers call the user's function with a `Guarded` context `g`::

    def train(g):
        model = MyModel(); opt = torch.optim.AdamW(model.parameters(), lr=g.lr)
        g.register(model, opt)                       # restores a checkpoint when resuming
        for batch in g.batches(MyDataset()):         # skip list, cursor, pause/rollback applied
            loss = model.loss(batch.data)
            loss.backward()
            g.step(loss)                             # average, clip, guard, optimizer.step, export

`g.batches` needs an index-addressable dataset (`__len__` and `__getitem__(int)`): a batch is
the pure function of its global sample indices that the skip list and an exact resume rely
on. Batch `b` of the stage's global `batch_size` holds samples [b*batch_size, (b+1)*batch_size)
(each rank its contiguous share); sample i is item `perm_e[i % len(dataset)]` of epoch
e = i // len(dataset), with perm_e a permutation seeded by (seed, e) — or the identity with
`shuffle=False`.

Everything around the forward and backward pass is the runtime harness's
(workers/runtime/harness.py), unchanged: the same checkpoints (model, optimizer, the state
objects registered, every RNG, cursor and skip list), control at the step boundary, the guard
before the optimizer, the same metrics and faults. The guard owns the LR: before each step it
sets every parameter group's LR from the stage's schedule (`lr`, `warmup_steps`,
`min_lr_ratio`), an anneal and the operator's multiplier, keeping each group's ratio to `lr`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from trainguard.workers.runtime.harness import Harness, StepStart
from trainguard.workers.stages.base import Stage, StageContext, StepResult

__all__ = ["Guarded", "Batch", "LoopError", "default_collate", "default_corrupt", "LOOP_API_VERSION"]

LOOP_API_VERSION = 1


class LoopError(RuntimeError):
    """The loop used the API out of order (e.g. two batches without a step between them)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Batch:
    """One step's data on this rank: `index` the global batch index, `samples` the global sample
    indices it holds (in order), `data` the collated items."""

    index: int
    samples: list[int]
    data: Any


def default_collate(items: Sequence[Any]) -> Any:
    """Tensors stacked; tuples, lists and dicts of tensors stacked field by field; numbers into
    a tensor; anything else left as the list."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, Mapping):
        return {k: default_collate([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(default_collate([it[i] for it in items]) for i in range(len(first)))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(list(items))
    return list(items)


def default_corrupt(data: Any) -> Any:
    """The `loss_spike` fault's corrupted batch when the loop gives no `corrupt`: floating-point
    tensors scaled by 50 and integer tensors (token ids) scrambled within their value range —
    for most objectives a loss several times the trained one. Give `g.batches(corrupt=...)` one
    that fits the objective (e.g. SFT targets replaced by a rare token)."""
    if isinstance(data, torch.Tensor):
        if data.is_floating_point():
            return data * 50.0
        if data.dtype != torch.bool and data.numel():
            top = int(data.max()) + 1
            return (data * 7919 + 13) % max(top, 2)
        return data
    if isinstance(data, Mapping):
        return {k: default_corrupt(v) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(default_corrupt(v) for v in data)
    return data


class _LoopStage(Stage):
    """The harness's view of a user's loop: its model, its evaluation and its state objects.
    `step` is never called: the user's loop does the forward and backward passes."""

    kind = "loop"

    def __init__(self, ctx: StageContext, model: nn.Module, evaluate: Callable[[], Mapping[str, float]] | None,
                 state: Mapping[str, Stateful]) -> None:
        super().__init__(ctx)
        self._model = model
        self._evaluate = evaluate
        self._state = dict(state)

    @property
    def model(self) -> nn.Module:
        return self._model

    def step(self, batch_index: int, step: int, mixture: dict[str, float], corrupt: bool = False,
             samples: list[int] | None = None) -> StepResult:
        raise LoopError("a loop stage's steps are the user's loop (g.batches / g.step)")

    def evaluate(self) -> dict[str, float]:
        return {k: float(v) for k, v in (self._evaluate() if self._evaluate is not None else {}).items()}

    def extra_state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self._state.items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, obj in self._state.items():
            if name in state:
                obj.load_state_dict(state[name])


class Guarded:
    """The loop API's context (one per rank). Made by the workers; see the module docstring."""

    api_version = LOOP_API_VERSION

    def __init__(self, ctx: StageContext, make_harness: Callable[..., Harness]) -> None:
        self.ctx = ctx
        self._make_harness = make_harness
        self._harness: Harness | None = None
        self._pending: StepStart | None = None
        self._session: Any = None  # the harness's session, entered at register()
        self._perms: dict[tuple[int, int], list[int]] = {}

    # -- what the loop reads --------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def seed(self) -> int:
        return self.ctx.seed

    @property
    def options(self) -> dict[str, Any]:
        """The stage's `options:` from the pipeline spec."""
        return self.ctx.options

    @property
    def lr(self) -> float:
        """The LR of the next step (the stage's `lr` before the loop registers its optimizer)."""
        h = self._harness
        return float(self.ctx.stage.lr) if h is None else h.lr_at(h.step)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored from the checkpoint on a resume or a rollback)."""
        return 0 if self._harness is None else self._harness.step

    @property
    def harness(self) -> Harness:
        if self._harness is None:
            raise LoopError("call g.register(model, optimizer) first")
        return self._harness

    # -- what the loop calls --------------------------------------------------------------------
    def register(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 evaluate: Callable[[], Mapping[str, float]] | None = None,
                 state: Mapping[str, Stateful] | None = None) -> None:
        """Hand the guard the trained module and its optimizer (and optionally a held-out
        `evaluate()` returning e.g. {"val_loss": ...}, and further objects with
        state_dict/load_state_dict saved in every checkpoint). When the stage resumes (a
        restart, a lost rank) their state is restored here, from the checkpoint."""
        if self._harness is not None:
            raise LoopError("g.register was called twice")
        model.to(self.ctx.device)
        stage = _LoopStage(self.ctx, model, evaluate, state or {})
        self._harness = self._make_harness(stage, optimizer=optimizer)
        self._session = self._harness.session()
        self._session.__enter__()

    def batches(self, dataset: Any, *, collate: Callable[[Sequence[Any]], Any] = default_collate,
                corrupt: Callable[[Any], Any] | None = None, shuffle: bool = True) -> Iterator[Batch]:
        """This rank's batches until the stage's `steps` are done or it is stopped. Between two
        batches (at the step boundary) the agreed control messages apply: pause blocks here,
        a rollback restores the registered state and moves the cursor back, stop ends the
        iteration. Call `g.step` once per batch."""
        h = self.harness
        n = len(dataset)
        if n < 1:
            raise LoopError("g.batches: the dataset is empty")
        while h.next_step():
            start = h.begin_step()
            lo, hi = h.sample_range(start.batch_index)
            samples = list(range(lo, hi))
            data = collate([dataset[self._item(i, n, shuffle)] for i in samples])
            if start.effects.corrupt:
                data = (corrupt or default_corrupt)(data)
            self._pending = start
            yield Batch(index=start.batch_index, samples=samples, data=data)
            if self._pending is not None:
                raise LoopError(f"batch {start.batch_index} was not followed by g.step()")

    def step(self, loss: torch.Tensor | float, *, tokens: int = 0,
             metrics: Mapping[str, float] | None = None) -> bool:
        """After the loop's backward pass on the current batch: average the gradients over the
        ranks, clip them (the stage's grad_clip), let the guard decide, step the optimizer when
        the step is sound (a non-finite one never reaches the weights), export the step's metrics,
        evaluate and checkpoint when due. Returns whether the update was applied. Do not call
        optimizer.step() or zero_grad() yourself: the guard does."""
        h = self.harness
        start = self._pending
        if start is None:
            raise LoopError("g.step() without a batch from g.batches()")
        self._pending = None
        loss_value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
        if start.effects.nan:  # the nan fault: as if a NaN had flowed through the backward pass
            loss_value = float("nan")
            for p in h.params:
                if p.grad is not None:
                    p.grad.mul_(float("nan"))
        result = StepResult(loss=torch.tensor(loss_value), tokens=int(tokens),
                            metrics={k: float(v) for k, v in (metrics or {}).items()})
        h.end_step(h.complete_step(start, loss_value, result))
        return h.last_applied

    def save(self) -> str | None:
        """Write a checkpoint now (every rank, at the same step; waits until it is written) and
        return its path on rank 0."""
        h = self.harness
        h._checkpoint(sync=True)
        return h.last_checkpoint if h.rank == 0 else None

    def restore(self, checkpoint: str | None = None) -> None:
        """Roll back in-process to `checkpoint` (a path this stage wrote, as `save` returns it on
        rank 0; default: the newest), as an operator's rollback does: the registered state
        reloaded, verified against the hashes recorded when it was written, the cursor back to
        that checkpoint's batch. Collective: every rank calls it at the same point (rank 0's
        choice of checkpoint counts)."""
        h = self.harness
        h.writer.wait()
        ref: dict[str, Any] | None = None
        if h.rank == 0:
            target = checkpoint or h.last_checkpoint
            ref = None if target is None else h.ref_of(target).to_dict()
        ref = h.dist.broadcast_from_rank0(ref)  # type: ignore[assignment]
        if ref is None:
            raise LoopError("g.restore: this stage has written no checkpoint yet")
        h.rollback(ref, [], None)

    # -- the workers' side ----------------------------------------------------------------------
    def run(self, loop: Callable[["Guarded"], Any]) -> dict[str, Any]:
        """Call the user's `loop(g)` inside the harness's session: when it returns, the last
        evaluation and the final checkpoint (unless stopped); returns the harness's result."""
        try:
            loop(self)
        except BaseException as e:
            if self._session is not None:
                self._session.__exit__(type(e), e, e.__traceback__)
            raise
        if self._session is None:
            raise LoopError("the loop returned without calling g.register(model, optimizer)")
        self._session.__exit__(None, None, None)
        return self.harness.result()

    def _item(self, sample: int, n: int, shuffle: bool) -> int:
        epoch, pos = divmod(sample, n)
        if not shuffle:
            return pos
        key = (epoch, n)
        perm = self._perms.get(key)
        if perm is None:
            g = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g).tolist()
            self._perms = {key: perm}  # one epoch at a time
        return perm[pos]
