"""Issue 10's acceptance test, "guard real models": a tiny Llama saved locally with
`transformers` goes through SFT -> reward model -> DPO on 2 CPU ranks sharded with FSDP2
(`parallel: {strategy: fsdp}`), and PPO on 1 rank, all under the supervisor in real Ray
workers. A loss spike injected into SFT (corrupted batches) is detected and rolled back, and
the skipped batches are never trained on again by any rank; the last stage (DPO) is exported
with `trainguard export` to a folder that `from_pretrained` loads and generates from.

The pipeline starts with a short pretrain stage (1 rank) on the saved model (SFT could start
from the folder itself): it gives SFT a settled loss, against which the corrupted batches
stand out (~3x) far above the spike detector's threshold. The FSDP2 stages write DCP
checkpoints (the default under FSDP2), one shard per rank."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.supervisor.harness import incidents, metrics_log, running_controller, wait_state
from tests.support import export_and_generate, save_tiny_llama
from trainguard.service.db import crud
from trainguard.workers.spec import parse_pipeline

pytestmark = pytest.mark.integration

CORPUS = [f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n    return x + {i}\n" for i in range(200)]
SPIKE_AT = 20  # batch index of the first corrupted SFT batch
SPIKE_FAMILY = ("loss_spike", "divergence", "grad_explosion")
FSDP = {"world_size": 2, "parallel": {"strategy": "fsdp"}}


def _pipeline(model_path: str):
    small = {"batch_size": 8, "eval_batches": 1}
    return parse_pipeline({
        "name": "hf-guarded", "seed": 11,
        "model": {"seq_len": 32, "hf": {"path": model_path}},
        "checkpoint": {"every": 5, "keep_last": 4},
        "stages": [
            {"name": "pretrain", "kind": "pretrain", "steps": 30, "lr": 1e-2, "eval_every": 30, **small},
            # the spike detector needs min_history (16) healthy steps, the rollback a good
            # checkpoint >= margin (10) steps before the onset: the one at step 10. `once: false`:
            # the corrupted batches corrupt every rank each time they are trained, so training one
            # again after the rollback would show as a second spike (and in the batch indices)
            {"name": "sft", "kind": "sft", "steps": 32, "lr": 3e-3, "eval_every": 40, **small, **FSDP,
             "faults": [{"kind": "loss_spike", "at_step": SPIKE_AT, "duration": 4, "once": False}]},
            {"name": "rm", "kind": "reward_model", "steps": 6, "lr": 2e-3, "eval_every": 40, **small, **FSDP},
            {"name": "ppo", "kind": "ppo", "steps": 3, "lr": 5e-4, "weight_decay": 0.0, "eval_every": 40,
             "response_len": 8, "reward_model": "rm", "reference": "sft", **small},
            {"name": "dpo", "kind": "dpo", "steps": 6, "lr": 1e-3, "weight_decay": 0.0, "eval_every": 40,
             "beta": 0.1, "reference": "sft", "init_from": "sft", **small, **FSDP},
        ],
    })


def test_hf_llama_sft_rm_ppo_dpo_fsdp_with_a_spike_rolled_back_then_export(ray_session, tmp_state, tmp_path, capsys):
    model_dir = tmp_state / "data" / "models" / "tiny-llama"  # <state>/data: the default allowed data root
    save_tiny_llama(model_dir, CORPUS)
    spec = _pipeline(str(model_dir))

    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id, timeout=300) == "completed"
        incs = incidents(ctl, run_id)
        with ctl.session() as s:
            stages = {st.name: st for st in crud.list_stages(s, run_id=run_id)}
    assert all(st.state == "completed" for st in stages.values()), [(n, st.state) for n, st in stages.items()]
    assert stages["dpo"].output_checkpoint
    for name in ("sft", "rm", "dpo"):  # sharded: each rank wrote its own part of the DCP checkpoint
        files = {p.name for p in Path(stages[name].output_checkpoint).iterdir()}
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"} <= files, (name, files)
    assert "model.pt" in {p.name for p in Path(stages["ppo"].output_checkpoint).iterdir()}

    # the spike in SFT: detected, rolled back to a checkpoint before its onset, resolved
    spikes = [i for i in incs if i.stage_name == "sft" and i.kind in SPIKE_FAMILY]
    assert spikes, f"no spike incident in sft: {[(i.stage_name, i.kind, i.onset_step, i.action) for i in incs]}"
    rolled = [i for i in spikes if i.action == "rollback"]
    assert len(rolled) == 1, [(i.kind, i.onset_step, i.action, i.outcome) for i in spikes]
    inc = rolled[0]
    assert inc.outcome == "resolved", inc.outcome
    assert inc.rollback_to_step is not None and inc.rollback_to_step < inc.onset_step
    assert abs(inc.onset_step - (SPIKE_AT + 1)) <= 3, inc.onset_step
    skip = [tuple(r) for r in inc.skip]
    assert any(a <= SPIKE_AT < b for a, b in skip), f"the corrupted batches are in the skip list {skip}"
    in_skip = lambda b: any(a <= b < e for a, e in skip)  # noqa: E731

    # both ranks trained every FSDP stage; after the rollback (the step counter goes back) no
    # rank trains a skipped batch again, and each rank finished the stage
    for stage in ("sft", "rm", "dpo"):
        for rank in (0, 1):
            log = metrics_log(tmp_state, run_id, stage, rank)
            assert log and log[-1]["step"] == spec.stage(stage).steps, f"{stage}: rank {rank} did not finish"
            assert {r["rank"] for r in log} == {rank}
    for rank in (0, 1):
        log = metrics_log(tmp_state, run_id, "sft", rank)
        backs = [i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"]]
        assert len(backs) == 1, f"rank {rank}: the sft log went back {len(backs)} times, not once (the rollback)"
        assert log[backs[0]]["step"] == inc.rollback_to_step + 1, (rank, log[backs[0]], inc.rollback_to_step)
        before = {r["batch_index"]: r["loss"] for r in log[:backs[0]]}
        assert SPIKE_AT in before, f"rank {rank} did not train the first corrupted batch before the rollback"
        healthy = sorted(loss for b, loss in before.items() if b < SPIKE_AT)
        assert before[SPIKE_AT] > 2 * healthy[len(healthy) // 2], f"rank {rank}: the corrupted batch did not spike"
        replay = [r["batch_index"] for r in log[backs[0]:]]
        assert not [b for b in replay if in_skip(b)], (rank, skip, replay)
    # PPO ran on one rank only
    ppo = metrics_log(tmp_state, run_id, "ppo", 0)
    assert ppo and ppo[-1]["step"] == spec.stage("ppo").steps
    assert not (tmp_state / "runs" / run_id / "ppo" / "metrics-rank1.jsonl").exists()

    # the last stage exports to a folder transformers loads (offline, safetensors) and generates from
    model = export_and_generate(run_id, "dpo", tmp_path / "export", tmp_state, capsys)
    # it is the trained model, not the folder the run started from
    start = load_file(model_dir / "model.safetensors")
    trained = {k: t for k, t in model.state_dict().items() if k in start}
    assert trained.keys() == start.keys(), sorted(set(start) ^ set(trained))
    assert any(not torch.equal(t, start[k]) for k, t in trained.items())
