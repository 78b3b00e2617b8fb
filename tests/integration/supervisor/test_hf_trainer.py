"""The Hugging Face Trainer integration under the real supervisor and Ray: examples/hf_trainer's
tiny Llama trained by `GuardedTrainer` on two ranks. The loss_spike fault's corrupted batches are
detected by the supervisor (no injected control), rolled back to the last good checkpoint with
the batches skipped and the LR lowered — asserted on both ranks' logs of global sample indices
and LR."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.integration.supervisor.harness import incidents, metrics_log, running_controller, wait_state
from trainguard.workers.runtime.harness import schedule_lr
from trainguard.workers.spec import parse_pipeline

pytest.importorskip("accelerate", reason="the hf-trainer extra (accelerate) is not installed")
pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "hf_trainer"
STEPS, SPIKE, LR = 70, 40, 1e-2


def test_a_spike_in_a_trainer_run_resumes_from_the_last_good_checkpoint_without_its_batches(ray_session, tmp_state):
    spec = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())
    st = spec["stages"][0]
    st.update(steps=STEPS, lr=LR, eval_every=35, step_delay=0.02, options={"block": 16},
              faults=[{"kind": "loss_spike", "at_step": SPIKE, "duration": 3}])
    spec["checkpoint"] = {"every": 10, "keep_last": 20}  # the rollback target outlives the detection
    stage = st["name"]
    with running_controller(tmp_state, user_code_modules=["tiny_llama"], user_code_paths=[str(EXAMPLE)]) as ctl:
        run_id = ctl.submit(parse_pipeline(spec), actor="test")
        assert wait_state(ctl, run_id, timeout=150) == "completed"
        spikes = [i for i in incidents(ctl, run_id) if i.kind == "loss_spike"]
    assert len(spikes) == 1, [(i.kind, i.onset_step, i.action) for i in incidents(ctl, run_id)]
    inc = spikes[0]
    assert inc.action == "rollback" and inc.outcome == "resolved", inc
    assert inc.rollback_to_step is not None and inc.rollback_to_step <= SPIKE and inc.lr_multiplier < 1.0
    skip = [tuple(r) for r in inc.skip]
    assert all(any(a <= b < e for a, e in skip) for b in range(SPIKE, SPIKE + 3)), f"the corrupted batches: {skip}"

    for rank in (0, 1):
        log = metrics_log(tmp_state, run_id, stage, rank)
        trained = [r["batch_index"] for r in log]
        back = next(i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"])
        assert log[back]["step"] - 1 == inc.rollback_to_step, "resumed from the checkpoint the incident names"
        assert not [b for b in trained[back:] if any(a <= b < e for a, e in skip)], "a skipped batch trained again"
        assert all(trained.count(b) == 1 for b in range(SPIKE, SPIKE + 3)), "each corrupted batch trained once"
        # each rank's half of the global batch of 16, by the global sample indices it logged
        assert all(r["samples"] == [16 * r["batch_index"] + 8 * rank, 16 * r["batch_index"] + 8 * (rank + 1)]
                   for r in log)
        assert log[-1]["step"] == STEPS
        # every step after the rollback ran at the schedule's LR x the incident's multiplier
        for r in log[back:]:
            expected = schedule_lr(r["step"] - 1, base=LR, total=STEPS, warmup=10, min_ratio=0.1) * inc.lr_multiplier
            assert r["lr"] == pytest.approx(expected, rel=1e-9)
        spiked = max(r["loss"] for r in log[:back] if r["batch_index"] >= SPIKE)
        assert max(r["loss"] for r in log[back:]) < spiked / 2, "the loss is back in its band"
