"""The Hugging Face Trainer under the loop API, in-process (no Ray): examples/hf_trainer's tiny
Llama trained by `GuardedTrainer` — a loss spike rolled back to the last good checkpoint with its
batches skipped (never trained again, by the logged sample indices), the LR lowered, the resume
exact; the Trainer's callbacks, evaluate and log still work; what cannot work is refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="the hf-trainer extra (accelerate) is not installed")

from transformers import TrainerCallback  # noqa: E402

from trainguard.workers.contract import CheckpointRef, Control, ControlKind  # noqa: E402
from trainguard.workers.runtime.harness import Harness, make_context, metrics_log_path, schedule_lr  # noqa: E402
from trainguard.workers.runtime.hf_trainer import GuardedTrainer, corrupt_labels, training_args  # noqa: E402
from trainguard.workers.runtime.loop import Guarded  # noqa: E402
from trainguard.workers.spec import parse_pipeline  # noqa: E402
from trainguard.workers.usercode import UserCode, load_entrypoint  # noqa: E402

torch.set_num_threads(1)
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "hf_trainer"
USER_CODE = UserCode(modules=("tiny_llama",), paths=(str(EXAMPLE),))
LR = 1e-2


def _spec(*, steps: int = 12, faults: list[dict[str, Any]] | None = None, **stage: Any):
    st = {"name": "s", "kind": "loop", "entrypoint": "tiny_llama:train", "steps": steps, "batch_size": 8, "lr": LR,
          "warmup_steps": 2, "eval_every": 6, "options": {"block": 16}, "faults": faults or [], **stage}
    return parse_pipeline({"name": "hf", "seed": 5, "checkpoint": {"every": 4, "keep_last": 10}, "stages": [st]})


def _run(spec, state_dir: Path, fn: Any = None, **kw: Any) -> Guarded:
    """`fn` (default: the example's train) run as the workers run a loop stage, on one rank."""
    ctx = make_context(spec, "s", run_id="hf", device=torch.device("cpu"))
    fn = fn or load_entrypoint(spec.stages[0].entrypoint, "loop", USER_CODE)

    def make(stage: Any, **extra: Any) -> Harness:
        return Harness(stage, spec=spec, stage_name="s", run_id="hf", state_dir=state_dir, **kw, **extra)

    g = Guarded(ctx, make)
    assert g.run(fn)["state"] == "finished"
    return g


def _log(state_dir: Path) -> list[dict[str, Any]]:
    path = metrics_log_path(state_dir, "hf", "s", 0)
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def example() -> Any:
    """The example module, imported as the workers import it (its folder put on sys.path)."""
    return sys.modules[load_entrypoint("tiny_llama:train", "loop", USER_CODE).__module__]


def _ck(h: Harness, step: int) -> CheckpointRef:
    return next(r for p, r in h.own.items() if p.endswith(f"step-{step:08d}"))


def test_a_spike_rolls_back_to_the_last_good_checkpoint_skips_its_batches_and_lowers_the_lr(tmp_path):
    """The loss_spike fault corrupts batches 20 and 21 (every label byte 0); at step 22 the rollback
    the supervisor sends — to the step-20 checkpoint, batches [20, 22) skipped, LR x0.5 — is
    applied at the step boundary. The Trainer then trains batches 22.. at half the schedule's LR,
    and ends bitwise where a run resumed from that checkpoint with the same skip list ends."""
    spec = _spec(steps=30, faults=[{"kind": "loss_spike", "at_step": 20, "duration": 2}])
    fired: list[int] = []

    def rollback_at_22(h: Harness) -> None:
        if h.step == 22 and not fired:
            fired.append(1)
            h.writer.wait()
            h.inbox.put(Control(ControlKind.ROLLBACK, seq=1, payload={
                "checkpoint": _ck(h, 20).to_dict(), "skip": [[20, 22]], "lr_multiplier": 0.5}))

    rolled = _run(spec, tmp_path / "a", on_step=rollback_at_22).harness
    log = _log(tmp_path / "a")
    losses = {r["batch_index"]: r["loss"] for r in log}
    assert min(losses[20], losses[21]) > 2 * max(losses[b] for b in range(12, 20)), f"a spike: {losses}"

    # trained: batches 0-21, then from the step-20 checkpoint batches 22.. (20, 21 never again)
    assert [r["batch_index"] for r in log] == list(range(32))
    assert [r["step"] for r in log] == [*range(1, 23), *range(21, 31)]
    assert all(r["samples"] == [8 * r["batch_index"], 8 * r["batch_index"] + 8] for r in log)
    after = log[22:]
    assert not {20, 21} & {r["batch_index"] for r in after}, "a skipped batch was trained again"
    # each step after the rollback at the schedule's LR x 0.5 (warmup 2, cosine to 0.1 x lr)
    for r in after:
        assert r["lr"] == pytest.approx(0.5 * schedule_lr(r["step"] - 1, base=LR, total=30, warmup=2, min_ratio=0.1),
                                        rel=1e-9)
    assert rolled.lr_multiplier == 0.5
    assert rolled.optimizer.param_groups[0]["lr"] == pytest.approx(rolled.lr_at(29), rel=1e-9)
    assert after[0]["loss"] < 0.5 * min(losses[20], losses[21]), "training went on from the good weights"
    assert all("val_loss" in r for r in log if r["step"] % 6 == 0), "Trainer.evaluate is trainguard's evaluation"

    fresh = _run(spec, tmp_path / "b", resume_from=_ck(rolled, 20), skip=[[20, 22]], lr_multiplier=0.5).harness
    assert [r["batch_index"] for r in _log(tmp_path / "b")] == list(range(22, 32))
    a, b = rolled.stage.model.state_dict(), fresh.stage.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resume is exact"
    oa, ob = rolled.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


class _Recorder(TrainerCallback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events: list[str] = []
        self.logs: list[dict[str, float]] = []
        self.steps: list[int] = []
        self.stop_at = stop_at

    def on_train_begin(self, args, state, control, **kw):
        self.events.append("train_begin")

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.append("evaluate")

    def on_train_end(self, args, state, control, **kw):
        self.events.append("train_end")


class _AuxLossTrainer(GuardedTrainer):
    """A user's Trainer subclass: its compute_loss logs a metric of its own."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.log({"aux": 1.5})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_the_trainers_callbacks_evaluate_and_logs_work_and_a_callback_may_end_the_stage(tmp_path, example):
    tiny_llama = example
    spec = _spec(steps=10, eval_every=4)
    rec = _Recorder(stop_at=7)

    def loop(g: Guarded) -> None:
        t = _AuxLossTrainer(g, model=tiny_llama.tiny_llama(16, g.seed), train_dataset=tiny_llama.ByteWindows(16),
                            eval_dataset=tiny_llama.ByteWindows(16, held_out=True),
                            args=training_args(g, logging_steps=3, learning_rate=1e-3), callbacks=[rec])
        out = t.train()
        assert out.global_step == 7 and out.training_loss > 0
        # args.learning_rate is only the groups' reference: they run at the stage's schedule
        assert t.optimizer.param_groups[0]["lr"] == pytest.approx(g.harness.lr_at(6), rel=1e-9)

    g = _run(spec, tmp_path, fn=loop)
    log = _log(tmp_path)
    assert g.global_step == 7 and [r["step"] for r in log] == list(range(1, 8)), "the callback ended the stage"
    assert rec.steps == list(range(1, 8))
    assert rec.events[0] == "train_begin" and "train_end" in rec.events and rec.events.count("evaluate") >= 2
    train_logs = [lg for lg in rec.logs if "learning_rate" in lg]
    assert len(train_logs) == 2 and all(lg["loss"] > 0 and lg["grad_norm"] > 0 for lg in train_logs)
    assert train_logs[0]["learning_rate"] == pytest.approx(log[2]["lr"], rel=1e-9)
    assert all(r["aux"] == 1.5 for r in log), "what compute_loss logs goes with its step into the metrics log"
    assert "val_loss" in log[3] and log[3]["val_loss"] > 0 and any("eval_loss" in lg for lg in rec.logs)


def test_corrupt_labels_and_what_the_guarded_trainer_refuses(tmp_path, example):
    tiny_llama = example

    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, -100, 7]])}
    assert corrupt_labels(batch)["labels"].tolist() == [[0, -100, 0]]
    assert torch.equal(corrupt_labels(batch)["input_ids"], batch["input_ids"])
    spec = _spec(steps=3)
    model = tiny_llama.tiny_llama(16, 0)
    ds = tiny_llama.ByteWindows(16)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(ds[i] for i in range(len(ds)))

    def refused(match: str, **kw: Any) -> Any:
        def loop(g: Guarded) -> None:
            train_kw = kw.pop("train_kw", {})
            with pytest.raises(ValueError, match=match):
                GuardedTrainer(g, model=model, **{"train_dataset": ds, **kw}).train(**train_kw)
            GuardedTrainer(g, model=model, train_dataset=ds).train()  # the stage still has to train
        return loop

    ctx = make_context(spec, "s", run_id="hf", device=torch.device("cpu"))
    g = Guarded(ctx, lambda stage, **e: Harness(stage, spec=spec, stage_name="s", run_id="hf", state_dir=tmp_path, **e))
    for match, kw in [("gradient_accumulation_steps", {"args": training_args(g, gradient_accumulation_steps=2)}),
                      ("index-addressable", {"train_dataset": Stream()}),
                      ("resume_from_checkpoint", {"train_kw": {"resume_from_checkpoint": True}})]:
        _run(spec, tmp_path / match, fn=refused(match, **kw))
