"""Gradient accumulation in the step loop (`micro_batch_size`): micro-steps over a rank's share
of the global batch train like one step over it, and resume stays exact."""
from __future__ import annotations

import pytest
import torch

from trainguard.workers.contract import Control, ControlKind
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.spec import SpecError, parse_pipeline
from trainguard.workers.stages import STAGES

torch.set_num_threads(1)


def _spec(steps: int = 8, **stage):
    st = {"name": "pretrain", "kind": "pretrain", "steps": steps, "batch_size": 8, "lr": 0.01, "warmup_steps": 2,
          "eval_every": 100, "eval_batches": 1, **stage}
    return parse_pipeline({"name": "acc", "seed": 4, "model": {"n_layer": 1, "n_head": 1, "d_model": 16, "seq_len": 16},
                           "checkpoint": {"every": 4, "keep_last": 5}, "stages": [st]})


def _harness(spec, state_dir, **kw) -> Harness:
    ctx = make_context(spec, "pretrain", run_id="acc", device=torch.device("cpu"))
    return Harness(STAGES["pretrain"](ctx), spec=spec, stage_name="pretrain", run_id="acc", state_dir=state_dir, **kw)


def _losses(h: Harness) -> list[float]:
    return [r["loss"] for r in h.exporter.history(0)]


def test_micro_steps_train_like_one_step_over_the_share(tmp_path):
    whole = _harness(_spec(), tmp_path / "whole")
    assert whole.run()["state"] == "finished"
    micro = _harness(_spec(micro_batch_size=3), tmp_path / "micro")  # 3 + 3 + 2: uneven parts weigh by size
    assert micro.run()["state"] == "finished"
    assert _losses(micro) == pytest.approx(_losses(whole), rel=1e-4)
    # the weights only to float noise: summing the parts' gradients reorders the reductions, and
    # AdamW's normalised update turns that into up to ~1.3e-5 after 8 steps (measured on an AMD
    # EPYC for micro sizes 1-5, even splits included); a mis-weighted part moves the losses above
    a, b = whole.stage.model.state_dict(), micro.stage.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_resume_with_micro_steps_is_bitwise_equal_to_uninterrupted(tmp_path):
    spec = _spec(micro_batch_size=4)
    full = _harness(spec, tmp_path / "a")
    assert full.run()["state"] == "finished"

    def stop_at_5(h: Harness) -> None:
        if h.step == 5:
            h.inbox.put(Control(ControlKind.STOP, seq=1))

    first = _harness(spec, tmp_path / "b", on_step=stop_at_5)
    out = first.run()
    assert out["state"] == "stopped" and out["step"] == 5
    second = _harness(spec, tmp_path / "b", resume_from=first.own[out["last_checkpoint"]])
    assert second.run()["state"] == "finished"
    a, b = full.stage.model.state_dict(), second.stage.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_stages_that_accumulate_accept_micro_batch_size():
    with pytest.raises(SpecError, match="micro_batch_size"):
        parse_pipeline({"name": "x", "stages": [
            {"name": "p", "kind": "pretrain", "steps": 10},
            {"name": "s", "kind": "sft", "steps": 10, "batch_size": 8, "micro_batch_size": 4}]})
