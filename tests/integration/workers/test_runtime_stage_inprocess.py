"""The real pretrain stage through the Harness in-process, metrics scraped over HTTP."""
from __future__ import annotations

import pytest
import torch

from trainguard.workers.contract import MetricName
from trainguard.workers.runtime.checkpoint import CheckpointError, list_checkpoints, stage_root, verify_checkpoint
from trainguard.workers.runtime.exporter import Exporter
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.spec import parse_pipeline
from trainguard.workers.stages import STAGES

from ._helpers import history, scrape, tiny_pipeline, value

pytestmark = pytest.mark.integration

torch.set_num_threads(1)
L = {"run": "r1", "stage": "pretrain", "rank": "0"}


def _harness(pipeline: dict, state_dir, **kw) -> Harness:
    spec = parse_pipeline(pipeline)
    ctx = make_context(spec, "pretrain", run_id="r1", device=torch.device("cpu"))
    return Harness(STAGES["pretrain"](ctx), spec=spec, stage_name="pretrain", run_id="r1", state_dir=state_dir, **kw)


def test_data_faults_show_their_symptoms_on_metrics(tmp_path):
    pipeline = tiny_pipeline(steps=40, faults=[
        {"kind": "nan", "at_step": 20, "duration": 2},
        {"kind": "loss_spike", "at_step": 32},
        {"kind": "checkpoint_corrupt", "at_step": 25},
    ])
    ex = Exporter("r1", "pretrain", 0)
    port = ex.start()
    h = _harness(pipeline, tmp_path, exporter=ex)
    before = [p for p in h.stage.model.parameters()]
    assert h.run()["state"] == "finished"
    m = scrape("127.0.0.1", port)
    assert value(m, "trainguard_anomalies_total", kind="nonfinite_loss", **L) == 2
    assert value(m, "trainguard_anomalies_total", kind="loss_spike", **L) >= 1
    assert all(torch.isfinite(p).all() for p in before)
    recs = [r for r in history("127.0.0.1", port, since=28)]
    assert [r["step"] for r in recs] == [r["seq"] for r in recs] == list(range(29, 41))
    assert "val_loss" in recs[-1] and "val_loss" not in recs[-2]  # eval joins its step's record
    spike = next(r for r in recs if r["batch_index"] == 32)
    assert spike["loss"] >= 3 * min(r["loss"] for r in recs if r["batch_index"] < 32)
    # checkpoint_corrupt: the first checkpoint at/after batch 25 is step 30; it no longer verifies
    ck = {c["step"]: c["path"] for c in list_checkpoints(stage_root(tmp_path / "checkpoints", "r1", "pretrain"))}
    with pytest.raises(CheckpointError, match="model.pt"):
        verify_checkpoint(h.own[ck[30]])
    verify_checkpoint(h.own[ck[40]])
    ex.close()


def test_real_stage_resume_is_bitwise_equal(tmp_path):
    pipeline = tiny_pipeline(steps=20)
    full = _harness(pipeline, tmp_path / "a", skip=[[3, 6]])
    full.run()
    first = _harness(pipeline, tmp_path / "b", skip=[[3, 6]])
    first.run()
    ck = {c["step"]: c["path"] for c in list_checkpoints(stage_root(tmp_path / "b" / "checkpoints", "r1", "pretrain"))}
    resumed = _harness(pipeline, tmp_path / "c", resume_from=first.own[ck[10]])
    assert resumed.cursor.skip == [[3, 6]] and resumed.step == 10
    resumed.run()
    a, b = full.stage.model.state_dict(), resumed.stage.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert value(scrape_text(resumed), MetricName.STEP, **L) == 20


def scrape_text(h: Harness) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return [s for fam in text_string_to_metric_families(h.exporter.text().decode()) for s in fam.samples]
