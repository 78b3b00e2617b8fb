"""A Hugging Face `transformers.Trainer` guarded by trainguard, through the loop API
(workers/runtime/loop.py; the optional extra `trainguard[hf-trainer]`, which adds accelerate)::

    from trainguard.workers.runtime.hf_trainer import GuardedTrainer

    def train(g):                                    # kind: loop, entrypoint: mymodule:train
        model = AutoModelForCausalLM.from_config(config)
        GuardedTrainer(g, model=model, train_dataset=train_ds, eval_dataset=held_out).train()

A callback cannot do the guard's work: the Trainer's loop draws its batches from a DataLoader
(no skipping a batch mid-epoch, no rewinding it), steps its optimizer and LR scheduler itself
(the guard decides before the optimizer; trainguard's schedule, anneal and multiplier own the LR)
and knows nothing of a rollback. So `GuardedTrainer.train()` replaces the Trainer's loop with the
loop API's — `g.batches` (skip list, cursor, pause/rollback/stop at the step boundary) and
`g.step` (average, clip, guard, optimizer step, export, checkpoint) — and keeps the rest the
Trainer's own: the forward and backward pass (`training_step` / `compute_loss`, so a subclass
overriding them still works), the optimizer (`create_optimizer`, from `args.optim`), the data
collator (unused columns removed as the Trainer does), `evaluate` (with `compute_metrics`),
and the callbacks (on_train_begin, on_epoch_begin/end, on_step_begin, on_pre_optimizer_step,
on_optimizer_step, on_step_end, on_log, on_evaluate, on_train_end).

What the stage's spec decides, whatever the TrainingArguments say (`training_args(g)` builds
ones that agree with it):

- steps (`steps`) and the batch (`batch_size`, global; each rank trains its contiguous share);
- the LR: the stage's `lr`, `warmup_steps`, `min_lr_ratio`, an operator's anneal and multiplier.
  No LR scheduler is created. `args.learning_rate` is only the reference of the optimizer's
  parameter groups: a group at k x args.learning_rate runs at k x the stage's LR;
- gradient clipping (`grad_clip`), evaluation (`eval_every`: `Trainer.evaluate()`, its
  eval_loss exported as val_loss) and checkpoints (`checkpoint.every`; the Trainer never saves);
- the seed (the pipeline's) and the device (the rank's).

Refused: gradient accumulation (a stage's batch is one optimizer step), fp16 (its GradScaler
would scale the loss behind the guard's back; bf16 works), DeepSpeed and FSDP (a loop stage's
gradients are averaged by g.step), `resume_from_checkpoint` (trainguard resumes the stage) and
a dataset that is not index-addressable (the skip list and an exact resume need sample i to be
a pure function of i).

A user callback may end the stage early (`control.should_training_stop`; all ranks agree);
`should_save` and `should_evaluate` are not acted on: the stage's checkpoint and evaluation
schedules are trainguard's. `should_log` logs {"loss", "grad_norm", "learning_rate", "epoch"}
through `Trainer.log`, as the Trainer does; whatever the user's code logs during a step
(`self.log(...)` from a `compute_loss` override) goes with that step's metrics into trainguard's
metrics log.

On several ranks every rank evaluates the whole eval set (the Trainer sees a world of one).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

if importlib.util.find_spec("accelerate") is None:  # transformers' Trainer needs it
    raise ImportError("the Hugging Face Trainer integration needs accelerate: pip install 'trainguard[hf-trainer]'")

from transformers import Trainer, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_utils import TrainOutput  # noqa: E402

from trainguard.workers.data import local_share  # noqa: E402
from trainguard.workers.runtime.loop import Guarded, default_corrupt  # noqa: E402

__all__ = ["GuardedTrainer", "training_args", "corrupt_labels", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # transformers' label for a position that is not a target
# the Trainer's bookkeeping in its eval metrics, not measurements of the model
_EVAL_NOISE = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def training_args(g: Guarded, **overrides: Any) -> TrainingArguments:
    """TrainingArguments that agree with the stage's spec: its LR, weight decay, clip, batch
    share, steps and seed, the rank's device, no saving, no reporting, no progress bars; a
    throwaway `output_dir` (the Trainer never writes to it). `overrides` win (e.g. bf16=True,
    optim="sgd", logging_steps=10)."""
    st = g.ctx.stage
    lo, hi = local_share(g.rank, g.world_size, st.batch_size)
    out = Path(tempfile.gettempdir()) / "trainguard-hf-trainer" / g.ctx.run_id / st.name / f"rank{g.rank}"
    kw: dict[str, Any] = dict(
        output_dir=str(out), report_to="none", disable_tqdm=True, use_cpu=g.device.type == "cpu",
        learning_rate=float(st.lr), weight_decay=float(st.weight_decay), max_grad_norm=float(st.grad_clip),
        lr_scheduler_type="constant", max_steps=int(st.steps), per_device_train_batch_size=hi - lo,
        seed=int(g.seed), save_strategy="no", eval_strategy="no", logging_strategy="steps",
        logging_steps=int(st.eval_every), dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def corrupt_labels(data: Any, token: int = 0) -> Any:
    """The `loss_spike` fault's corrupted batch for a batch with `labels` (causal LM, SFT,
    classification): every target replaced by `token` (ignored positions stay ignored); the
    inputs untouched. Anything else: the loop API's default_corrupt."""
    if isinstance(data, Mapping) and isinstance(data.get("labels"), torch.Tensor):
        labels = data["labels"]
        return {**data, "labels": torch.where(labels == IGNORE_INDEX, labels, torch.full_like(labels, token))}
    return default_corrupt(data)


def _tokens(data: Any) -> int:
    if isinstance(data, Mapping):
        mask, ids = data.get("attention_mask"), data.get("input_ids")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        if isinstance(ids, torch.Tensor):
            return int(ids.numel())
    return 0


class GuardedTrainer(Trainer):
    """A `transformers.Trainer` whose `train()` is the loop API's loop (see the module docstring).
    `g`: the loop API's context; `args`: default `training_args(g)`; `corrupt`: the loss_spike
    fault's corrupted batch (default `corrupt_labels`); `shuffle`: the loop API's seeded
    permutation of the dataset per epoch. Everything else is the Trainer's."""

    def __init__(self, g: Guarded, model: Any = None, args: TrainingArguments | None = None, *,
                 corrupt: Callable[[Any], Any] | None = None, shuffle: bool = True, **kwargs: Any) -> None:
        self.g = g
        self.corrupt = corrupt or corrupt_labels
        self.shuffle = shuffle
        self._in_step = False
        self._step_logs: dict[str, float] = {}
        super().__init__(model=model, args=args if args is not None else training_args(g), **kwargs)
        self._check_args()

    def _check_args(self) -> None:
        a, g = self.args, self.g
        if a.gradient_accumulation_steps != 1:
            raise ValueError("GuardedTrainer: gradient_accumulation_steps must be 1 (the stage's batch_size is one "
                             "optimizer step)")
        if a.fp16:
            raise ValueError("GuardedTrainer: fp16 needs a GradScaler the guard does not drive; use bf16")
        if a.deepspeed or a.fsdp:
            raise ValueError("GuardedTrainer: DeepSpeed and FSDP are not supported (g.step averages the gradients)")
        if a.device.type != g.device.type:
            raise ValueError(f"GuardedTrainer: the TrainingArguments' device is {a.device}, the rank's {g.device} "
                             f"(use training_args(g), or use_cpu={g.device.type == 'cpu'})")
        a._n_gpu = min(a._n_gpu, 1)  # the rank's one device: no DataParallel in evaluate

    # -- the Trainer's hooks -----------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's `log`; during a step, what the user's code logs also goes with the step's
        metrics into trainguard's metrics log."""
        if self._in_step:
            self._step_logs.update({k: float(v) for k, v in logs.items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        super().log(logs, start_time)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # bf16: accelerate's autocast, put on the model in train()

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """Train the stage: the loop API's batches, the Trainer's `training_step`, the guard's step.
        Returns the Trainer's TrainOutput (global step, mean training loss of this call)."""
        if resume_from_checkpoint:
            raise ValueError("GuardedTrainer.train: trainguard resumes the stage from its own checkpoints; "
                             "resume_from_checkpoint is not taken")
        if trial is not None:
            raise ValueError("GuardedTrainer.train: hyperparameter search is not supported")
        dataset, collate = self._train_data()
        g, args = self.g, self.args
        st = g.ctx.stage
        self.is_in_train = True
        # bf16: the forward under autocast, in training and in evaluate alike; no DDP wrapper
        self.model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        self.model_wrapped = self.model
        optimizer = self.create_optimizer()
        base = float(args.learning_rate)
        if base > 0 and base != float(st.lr):  # a group keeps its ratio to args.learning_rate
            for group in optimizer.param_groups:
                group["lr"] = float(group["lr"]) / base * float(st.lr)
        g.register(self.model, optimizer, evaluate=self._guarded_evaluate if self.eval_dataset is not None else None)
        h = g.harness
        self.callback_handler.model = self.model
        self.callback_handler.optimizer = optimizer
        self.callback_handler.lr_scheduler = None
        self.current_gradient_accumulation_steps = 1

        lo, hi = local_share(g.rank, g.world_size, st.batch_size)
        self.state = TrainerState(stateful_callbacks=[], is_local_process_zero=g.rank == 0,
                                  is_world_process_zero=g.rank == 0, train_batch_size=hi - lo)
        self.state.max_steps = int(st.steps)
        self.state.num_train_epochs = max(1, math.ceil(st.steps * st.batch_size / len(dataset)))
        self.state.compute_steps(args, int(st.steps))
        self.state.global_step = g.global_step
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

        losses: list[float] = []  # this call's steps, for TrainOutput
        window: list[float] = []  # since the last log
        epoch: int | None = None
        for batch in g.batches(dataset, collate=collate, corrupt=self.corrupt, shuffle=self.shuffle):
            this_epoch = batch.index * st.batch_size // len(dataset)
            if this_epoch != epoch:
                if epoch is not None:
                    self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
                epoch = this_epoch
                self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            self.state.global_step = g.global_step  # a rollback may have moved it back
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._in_step, self._step_logs = True, {}
            try:
                loss = self.training_step(self.model, batch.data)
            finally:
                self._in_step = False
            tokens = _tokens(batch.data)
            self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
            if g.step(loss, tokens=tokens, metrics=self._step_logs):
                self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
            value = float(loss)
            losses.append(value)
            window.append(value)
            self.state.global_step = g.global_step
            self.state.epoch = (batch.index + 1) * st.batch_size / len(dataset)
            self.state.num_input_tokens_seen += tokens
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_log:
                self.log({"loss": sum(window) / len(window), "grad_norm": float(h.last_grad_norm),
                          "learning_rate": float(optimizer.param_groups[0]["lr"])})
                window = []
            if self._agreed_stop(bool(self.control.should_training_stop) and g.global_step < st.steps):
                break
        if epoch is not None:
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        return TrainOutput(g.global_step, train_loss, {"train_loss": train_loss})

    def _agreed_stop(self, stop: bool) -> bool:
        """Whether any rank's callbacks ended training (collective: every rank asks every step)."""
        dist = self.g.harness.dist
        return stop if not dist.enabled else dist.min_int(0 if stop else 1) == 0

    def _train_data(self) -> tuple[Any, Callable[[Any], Any]]:
        """The training set and collator as the Trainer's DataLoader would see them (columns the
        model's forward does not take removed)."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("GuardedTrainer.train: no train_dataset")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("GuardedTrainer.train: the train_dataset must be index-addressable (__len__ and "
                             "__getitem__(int)); the skip list and an exact resume need sample i to be a pure "
                             "function of i")
        collate = self.data_collator
        datasets = sys.modules.get("datasets")  # a datasets.Dataset means the library is imported
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            return self._remove_unused_columns(dataset, description="training"), collate
        return dataset, self._get_collator_with_removed_columns(collate, description="training")

    def _guarded_evaluate(self) -> dict[str, float]:
        """trainguard's evaluation (every `eval_every` steps and at the end): `Trainer.evaluate()`,
        its eval_loss as val_loss, its other eval metrics as they are named."""
        metrics = self.evaluate()
        out = {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and k != "eval_loss"
               and not k.endswith(_EVAL_NOISE) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "eval_loss" in metrics:
            out["val_loss"] = float(metrics["eval_loss"])
        return out
