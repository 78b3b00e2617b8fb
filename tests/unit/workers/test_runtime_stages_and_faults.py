"""Anneal stage LR, best-eval output checkpoint, once-fault markers, fake NVML, exporter HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from trainguard.workers.contract import FaultKind
from trainguard.workers.runtime.exporter import Exporter
from trainguard.workers.runtime.faults import FaultInjector
from trainguard.workers.runtime.gpu import FakeNvmlGpuHealth, GpuHealth, make_gpu_health
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.runtime.checkpoint import read_manifest
from trainguard.workers.spec import FaultSpec, parse_pipeline

from ._tiny import TinyStage

torch.set_num_threads(1)


def _two_stage_spec(**anneal):
    a = {"name": "cooldown", "kind": "anneal", "steps": 10, "lr": 0.01, "final_lr": 0.001, "schedule": "linear",
         "mixture": {"curated": 1.0}}
    a.update(anneal)
    return parse_pipeline({"name": "t", "seed": 3, "checkpoint": {"every": 5, "keep_last": 3},
                           "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 10}, a]})


def test_anneal_stage_decays_from_its_lr_to_final_lr(tmp_path):
    spec = _two_stage_spec()
    ctx = make_context(spec, "cooldown", run_id="r", device=torch.device("cpu"))
    h = Harness(TinyStage(ctx), spec=spec, stage_name="cooldown", run_id="r", state_dir=tmp_path)
    h.run()
    lrs = [r["lr"] for r in h.exporter.history(0)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001 + 0.009 * 0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


class BestStage(TinyStage):
    """val_loss that is best at step 10 (of 20): the output must be the step-10 checkpoint."""

    def evaluate(self):
        return {"val_loss": abs(self.h.step - 10) + 1.0}

    def output_metric(self):
        return "val_loss"


def test_stage_with_output_metric_outputs_its_best_checkpoint(tmp_path):
    from ._tiny import tiny_spec

    spec = tiny_spec(steps=20)
    ctx = make_context(spec, "pretrain", run_id="r", device=torch.device("cpu"))
    stage = BestStage(ctx)
    h = Harness(stage, spec=spec, stage_name="pretrain", run_id="r", state_dir=tmp_path)
    stage.h = h
    out = h.run()
    assert out["output_checkpoint"].endswith("step-00000010")
    m = read_manifest(out["output_checkpoint"])
    assert "best" in m["tags"] and m["metrics"]["val_loss"] == 1.0
    assert "final" in read_manifest(out["last_checkpoint"])["tags"]


def test_once_fault_fires_once_across_process_restarts(tmp_path):
    faults = [FaultSpec(kind=FaultKind.NAN, at_step=3, duration=2)]
    first = FaultInjector(faults, rank=0, run_id="r", stage="s", fired_dir=tmp_path)
    assert [first.before_step(b).nan for b in range(6)] == [False, False, False, True, True, False]
    first.rewound()
    assert not first.before_step(3).nan  # replay after a rollback: fired already
    restarted = FaultInjector(faults, rank=0, run_id="r", stage="s", fired_dir=tmp_path)
    assert not any(restarted.before_step(b).nan for b in range(6))
    repeating = FaultInjector([FaultSpec(kind=FaultKind.NAN, at_step=3, once=False)], rank=0, run_id="r", stage="s")
    assert repeating.before_step(3).nan and repeating.before_step(3).nan


def test_a_once_data_fault_hits_every_rank_sharing_a_marker_folder(tmp_path):
    """Ranks share `fired_dir`: the first rank to reach the batch must not silence the others."""
    faults = [FaultSpec(kind=FaultKind.LOSS_SPIKE, at_step=2)]
    ranks = [FaultInjector(faults, rank=r, run_id="r", stage="s", fired_dir=tmp_path) for r in range(2)]
    assert [ranks[0].before_step(b).corrupt for b in range(4)] == [False, False, True, False]
    assert [ranks[1].before_step(b).corrupt for b in range(4)] == [False, False, True, False]
    again = [FaultInjector(faults, rank=r, run_id="r", stage="s", fired_dir=tmp_path) for r in range(2)]
    assert not any(inj.before_step(2).corrupt for inj in again)  # once per rank, across restarts


def test_fake_nvml_counts_injected_xids():
    gpu = make_gpu_health()
    assert isinstance(gpu, GpuHealth)
    fake = FakeNvmlGpuHealth()
    inj = FaultInjector([FaultSpec(kind=FaultKind.GPU_XID, at_step=2, rank=1)], rank=1, run_id="r", stage="s", gpu=fake)
    for b in range(4):
        inj.before_step(b)
    assert fake.sample().xid_errors == 1 and "fake" in fake.name


def test_exporter_serves_metrics_and_history_over_http():
    ex = Exporter("r", "s", 2, gpu=FakeNvmlGpuHealth())
    port = ex.start()
    try:
        for step in range(1, 6):
            ex.record({"step": step, "loss": float(step)})
        base = f"http://127.0.0.1:{port}"
        hist = json.loads(urllib.request.urlopen(f"{base}/history?since=3").read())
        assert [r["step"] for r in hist] == [4, 5]
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert 'trainguard_gpu_xid_errors_total{provider="fake-nvml",rank="2",run="r",stage="s"} 0.0' in text
        assert 'trainguard_anomalies_total{kind="nonfinite_loss",rank="2",run="r",stage="s"} 0.0' in text
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/history?since=x")
        assert e.value.code == 400
    finally:
        ex.close()


def test_a_gauge_a_stage_never_sets_exports_no_series():
    """Stage gauges appear on their first set: a PPO gauge at 0 on a pretrain stage would read
    as a collapsed policy ratio (the TrainguardPolicyRatio alert)."""
    from trainguard.workers.contract import MetricName

    ex = Exporter("r", "pretrain", 0)
    text = ex.text().decode()
    assert 'trainguard_ppo_ratio_mean{' not in text and "trainguard_step_seconds_count{" not in text
    assert 'trainguard_step{rank="0",run="r",stage="pretrain"} 0.0' in text
    ex.set(MetricName.TRAIN_LOSS, 2.5)
    ex.observe_step(0.1, 64)
    text = ex.text().decode()
    assert 'trainguard_train_loss{rank="0",run="r",stage="pretrain"} 2.5' in text
    assert 'trainguard_step_seconds_count{rank="0",run="r",stage="pretrain"} 1.0' in text
    assert 'trainguard_ppo_ratio_mean{' not in text


def test_history_since_returns_only_newer_records_in_order():
    ex = Exporter("r", "s", 0, history_size=5)
    for step in range(1, 9):
        ex.record({"step": step})
    assert [r["step"] for r in ex.history(0)] == [4, 5, 6, 7, 8]  # the ring keeps the newest 5
    assert [r["step"] for r in ex.history(6)] == [7, 8]
    assert ex.history(8) == []
