"""The step loop in-process (no Ray): exact resume, skip list, guard, faults, controls."""
from __future__ import annotations

import json

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from trainguard.workers.contract import Control, ControlKind, MetricName
from trainguard.workers.runtime.checkpoint import CheckpointCorrupt, list_checkpoints, stage_root, verify_checkpoint
from trainguard.workers.runtime.harness import Harness, make_context, metrics_log_path

from ._tiny import TinyStage, stop_at, tiny_spec, weights

torch.set_num_threads(1)


def _harness(spec, state_dir, **kw) -> Harness:
    ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"))
    return Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=state_dir, **kw)


FORMATS = ["torch", "dcp"]


def _in(spec, fmt: str, **checkpoint):
    """`spec` writing checkpoints in format `fmt` (and other checkpoint options)."""
    return spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"format": fmt, **checkpoint})})


def sample(h: Harness, name: str, **labels) -> float | None:
    for fam in text_string_to_metric_families(h.exporter.text().decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("skip", [[], [[5, 9]]])
def test_resume_from_stop_is_bitwise_equal_to_uninterrupted(tmp_path, skip, fmt):
    spec = _in(tiny_spec(steps=24), fmt)
    full = _harness(spec, tmp_path / "a", skip=skip)
    assert full.run()["state"] == "finished"

    first = _harness(spec, tmp_path / "b", skip=skip, on_step=stop_at(11))
    out = first.run()
    assert out["state"] == "stopped" and out["step"] == 11 and out["last_checkpoint"].endswith("step-00000011")
    assert ("model.pt" in first.own[out["last_checkpoint"]].files) == (fmt == "torch")
    second = _harness(spec, tmp_path / "b", skip=skip, resume_from=first.own[out["last_checkpoint"]])
    assert second.step == 11
    assert second.run()["state"] == "finished"
    a, b = weights(full), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.optimizer.state_dict()["state"][0]["exp_avg"], second.optimizer.state_dict()["state"][0]["exp_avg"])


def test_skipped_batches_are_never_trained_on(tmp_path):
    h = _harness(tiny_spec(steps=10), tmp_path, skip=[[2, 5]])
    h.run()
    recs = [json.loads(x) for x in metrics_log_path(tmp_path, "run1", "pretrain", 0).read_text().splitlines()]
    batches = [r["batch_index"] for r in recs]
    assert batches == [0, 1, 5, 6, 7, 8, 9, 10, 11, 12]
    assert [r["step"] for r in recs] == list(range(1, 11))


def test_nan_fault_is_rejected_before_the_optimizer(tmp_path):
    spec = tiny_spec(steps=12, faults=[{"kind": "nan", "at_step": 6, "duration": 2}])
    h = _harness(spec, tmp_path)
    h.run()
    assert sample(h, "trainguard_anomalies_total", kind="nonfinite_loss") == 2.0
    assert all(torch.isfinite(v).all() for v in h.stage.model.state_dict().values())
    # the checkpoint at step 10 saw the anomaly within its window (steps 7, 8): unhealthy
    ck = {m["step"]: m for m in list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))}
    assert ck[10]["healthy"] is False and ck[10]["anomalies_in_window"] == 2
    assert ck[5]["healthy"] is True


def test_loss_spike_fault_jumps_the_loss_and_counts_a_spike(tmp_path):
    spec = tiny_spec(steps=40, lr=0.05, faults=[{"kind": "loss_spike", "at_step": 30, "duration": 2}])
    h = _harness(spec, tmp_path)
    h.run()
    recs = [r for r in h.exporter.history(0)]
    before = sum(r["loss"] for r in recs[25:30]) / 5
    assert recs[30]["loss"] >= 3 * before
    assert recs[30]["anomaly"] == "loss_spike" and recs[30]["spike_score"] > 6
    assert sample(h, "trainguard_anomalies_total", kind="loss_spike") >= 1


def test_lr_burst_fault_multiplies_the_learning_rate(tmp_path):
    spec = tiny_spec(steps=12, faults=[{"kind": "loss_spike", "mode": "lr_burst", "at_step": 8, "factor": 50}])
    h = _harness(spec, tmp_path)
    h.run()
    recs = [r for r in h.exporter.history(0)]
    assert recs[8]["lr"] == pytest.approx(50 * h.lr_at(8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_controls_lr_multiplier_anneal_and_rollback_in_process(tmp_path, fmt):
    spec = _in(tiny_spec(steps=30), fmt)
    seq = iter(range(1, 100))
    rolled_back = []

    def hook(h: Harness) -> None:
        if h.step == 6:
            h.inbox.put(Control(ControlKind.LR_MULTIPLIER, next(seq), {"value": 0.5}))
        if h.step == 12 and not rolled_back:
            rolled_back.append(True)
            h.writer.wait()
            ck = h.own[list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))[-1]["path"]].to_dict()
            h.inbox.put(Control(ControlKind.ROLLBACK, next(seq), {"checkpoint": ck, "skip": [[10, 14]], "lr_multiplier": 0.25}))
        if h.step == 20 and h.anneal is None:
            h.inbox.put(Control(ControlKind.ANNEAL, next(seq), {"steps": 5, "final_lr": 1e-5, "schedule": "cosine"}))

    h = _harness(spec, tmp_path, on_step=hook)
    h.run()
    recs = [r for r in h.exporter.history(0)]
    by_step: dict[int, list] = {}
    for r in recs:
        by_step.setdefault(r["step"], []).append(r)
    assert by_step[7][0]["lr"] == pytest.approx(0.5 * h._base_lr(6))
    # rollback at step 12 to the step-10 checkpoint: steps 11, 12 replayed on batches 14, 15
    assert [r["batch_index"] for r in by_step[11]] == [10, 14]
    assert by_step[11][1]["lr"] == pytest.approx(0.25 * h._base_lr(10))
    assert h.cursor.skip == [[10, 14]]
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(set(seqs))  # replayed steps get fresh seqs: a /history cursor misses nothing
    assert recs[-1]["lr"] == pytest.approx(1e-5)
    assert h.result()["state"] == "finished"


@pytest.mark.parametrize("fmt", FORMATS)
def test_rollback_to_a_corrupt_checkpoint_fails_naming_the_file(tmp_path, fmt):
    spec = _in(tiny_spec(steps=12, faults=[{"kind": "checkpoint_corrupt", "at_step": 4}]), fmt)
    h = _harness(spec, tmp_path)
    h.run()
    ck = {m["step"]: m["path"] for m in list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))}
    flipped = "model.pt" if fmt == "torch" else r"__0_0\.distcp"  # the fault flips the model's file
    with pytest.raises(CheckpointCorrupt, match=flipped):
        verify_checkpoint(h.own[ck[5]])
    verify_checkpoint(h.own[ck[10]])
    before = weights(h)
    with pytest.raises(CheckpointCorrupt, match=flipped):
        h.rollback(ck[5], [], None)
    after = weights(h)
    assert h.step == 12 and all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded


def test_exported_metrics_carry_run_stage_rank(tmp_path):
    h = _harness(tiny_spec(steps=10), tmp_path)
    h.run()
    labels = {"run": "run1", "stage": "pretrain", "rank": "0"}
    for name in (MetricName.STEP, MetricName.TRAIN_LOSS, MetricName.VAL_LOSS, MetricName.GRAD_NORM, MetricName.LEARNING_RATE, MetricName.LAST_STEP_TS, MetricName.SPIKE_SCORE,
                 MetricName.CHECKPOINT_STEP, MetricName.CHECKPOINT_BYTES, MetricName.MODEL_PARAMETERS, MetricName.TOKENS_PER_PARAMETER, MetricName.WORKER_PAUSED,
                 "trainguard_tokens_total", "trainguard_step_seconds_count", "trainguard_checkpoint_seconds_count",
                 "trainguard_anomalies_total"):
        assert sample(h, name, **labels) is not None, name
    assert sample(h, MetricName.STEP, **labels) == 10
    assert sample(h, MetricName.CHECKPOINT_STEP, **labels) == 10


def test_checkpoints_on_an_fsspec_url_resume_exactly(tmp_path):
    root = "memory://tg-harness-resume"
    spec = tiny_spec(steps=12)
    full = _harness(spec, tmp_path / "a")
    full.run()
    first = _harness(spec, tmp_path / "b", checkpoint_root=root, on_step=stop_at(7))
    out = first.run()
    assert out["last_checkpoint"] == "memory:///tg-harness-resume/run1/pretrain/step-00000007"
    second = _harness(spec, tmp_path / "b", checkpoint_root=root, resume_from=first.own[out["last_checkpoint"]])
    second.run()
    assert second.result()["output_checkpoint"].startswith("memory://")
    a, b = weights(full), weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_retention_keeps_the_checkpoints_before_a_recent_anomaly_for_the_rollback(tmp_path, fmt):
    """keep_last 2, checkpoints every 5 steps, a NaN at step 17: the two checkpoints still there
    before it (10, 15) must outlive a detection that comes many steps later; the others go as
    usual (5 before the anomaly, 20-30 after it)."""
    spec = _in(tiny_spec(steps=40, faults=[{"kind": "nan", "at_step": 16, "duration": 1}]), fmt, keep_last=2)
    h = _harness(spec, tmp_path)
    h.run()
    assert h.anomaly_steps == [17]
    steps = [m["step"] for m in list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))]
    assert steps == [10, 15, 35, 40]


def test_retention_protects_nothing_without_an_anomaly(tmp_path):
    spec = tiny_spec(steps=30)
    spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"keep_last": 1})})
    h = _harness(spec, tmp_path)
    h.run()
    assert [m["step"] for m in list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))] == [30]
    assert h.retention_protect() == frozenset()


def test_async_checkpoints_hold_their_steps_state_while_the_next_step_runs(tmp_path, monkeypatch):
    """The torch format stages the weights and optimizer state into reused buffers, copied by the
    writer thread beside the next step: slowed down here, so the next optimizer step must wait
    for the copy. Each checkpoint holds exactly the state of its step, and resuming from one
    is bitwise equal to the uninterrupted run."""
    import time

    from trainguard.workers.runtime import checkpoint as ck

    real = ck._copy_pairs

    def slow(pairs):
        time.sleep(0.05)
        real(pairs)

    monkeypatch.setattr(ck, "_copy_pairs", slow)
    spec = tiny_spec(steps=16)
    seen: dict[int, tuple[dict, dict]] = {}

    def record(h):
        if h.step % 5 == 0:
            seen[h.step] = (weights(h), {k: v.clone() for k, v in h.optimizer.state_dict()["state"][0].items()})

    full = _harness(spec, tmp_path / "a", on_step=record)
    full.run()
    assert full.writer.staging_wait_s > 0  # an optimizer step did wait for a staging copy
    for step in (10, 15):  # (retention, keep_last 3, has deleted step 5 by now)
        path = f"{tmp_path / 'a' / 'checkpoints'}/run1/pretrain/step-{step:08d}"
        got = ck.load_checkpoint(full.own[path])
        w, opt0 = seen[step]
        assert all(torch.equal(got["model"][k], w[k]) for k in w), step
        assert all(torch.equal(got["optimizer"]["state"][0][k], opt0[k]) for k in opt0), step
    resumed = _harness(spec, tmp_path / "b", resume_from=full.own[f"{tmp_path / 'a' / 'checkpoints'}/run1/pretrain/step-00000010"])
    resumed.run()
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rollback_run(tmp_path, in_memory: int, target: int, monkeypatch) -> tuple[Harness, list[str]]:
    """30 steps, checkpoints every 5; at step 17 a ROLLBACK to the checkpoint of `target`
    (skipping batches 10-12, LR halved). Returns the harness and the paths loaded from files."""
    import trainguard.workers.runtime.harness as harness_mod

    loaded: list[str] = []
    real = harness_mod.load_checkpoint

    def counting(ref, **kw):
        loaded.append(ref.path)
        return real(ref, **kw)

    monkeypatch.setattr(harness_mod, "load_checkpoint", counting)
    spec = _in(tiny_spec(steps=30), "torch", in_memory=in_memory)
    sent = []

    def hook(h: Harness) -> None:
        if h.step == 17 and not sent:
            sent.append(True)
            h.writer.wait()
            path = {c["step"]: c["path"] for c in list_checkpoints(stage_root(tmp_path / str(in_memory) / "checkpoints",
                                                                              "run1", "pretrain"))}[target]
            h.inbox.put(Control(ControlKind.ROLLBACK, 1, {"checkpoint": h.own[path].to_dict(), "skip": [[10, 13]],
                                                          "lr_multiplier": 0.5}))

    h = _harness(spec, tmp_path / str(in_memory), on_step=hook)
    assert h.run()["state"] == "finished"
    return h, loaded


def test_a_rollback_from_the_memory_copy_trains_exactly_as_one_from_the_files(tmp_path, monkeypatch):
    disk, loaded_disk = _rollback_run(tmp_path, 0, 10, monkeypatch)
    mem, loaded_mem = _rollback_run(tmp_path, 2, 10, monkeypatch)  # copies of 10 and 15: the older one
    assert len(loaded_disk) == 1 and loaded_mem == []  # the memory copy was used, no file read
    a, b = weights(disk), weights(mem)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = disk.optimizer.state_dict()["state"], mem.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert [r["loss"] for r in disk.exporter.history(0)] == [r["loss"] for r in mem.exporter.history(0)]
    assert disk.cursor.skip == mem.cursor.skip == [[10, 13]]


def test_a_rollback_past_the_memory_copies_reads_the_files(tmp_path, monkeypatch):
    h, loaded = _rollback_run(tmp_path, 2, 5, monkeypatch)  # copies of 10 and 15 only
    assert [p.rsplit("/", 1)[-1] for p in loaded] == ["step-00000005"]
    assert h.step == 30


def test_a_reference_naming_other_bytes_is_never_served_from_memory(tmp_path):
    spec = _in(tiny_spec(steps=12), "torch", in_memory=2)
    h = _harness(spec, tmp_path)
    h.run()
    path = {c["step"]: c["path"] for c in list_checkpoints(stage_root(tmp_path / "checkpoints", "run1", "pretrain"))}[10]
    ref = h.own[path].to_dict()
    ref["files"]["model.pt"] = {**ref["files"]["model.pt"], "bytes": ref["files"]["model.pt"]["bytes"] + 1}
    before = weights(h)
    with pytest.raises(CheckpointCorrupt, match="model.pt"):  # read from the files, which do not match it
        h.rollback(ref, [], None)
    assert all(torch.equal(before[k], weights(h)[k]) for k in before)
