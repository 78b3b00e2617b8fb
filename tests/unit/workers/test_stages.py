"""Each stage trains measurably under a minimal local loop, and corrupted batches spike.

The stages are chained as in a pipeline (pretrain -> anneal / sft -> reward model ->
PPO, DPO) through real checkpoint directories (model.pt + manifest.json), with a
tiny model so the whole file runs in well under a minute on one core.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainguard.workers import spec as S
from trainguard.workers.contract import CheckpointRef, StageKind
from trainguard.workers.stages import STAGES, Stage, StageContext, StepResult
from trainguard.workers.stages.ppo import kl_controller_update
from trainguard.workers.stages.pretrain import find_input
from trainguard.workers.tokenizer import BYTE_TOKENIZER

from tests.support import StageSignalsStub

from ._tiny import recorded

torch.set_num_threads(1)
MODEL = S.ModelSpec(n_layer=2, n_head=2, d_model=48, seq_len=96)
SPEC_CLASSES = {
    "pretrain": S.PretrainStage, "anneal": S.AnnealStage, "sft": S.SFTStage,
    "reward_model": S.RewardModelStage, "ppo": S.PPOStage, "dpo": S.DPOStage,
}


def make_stage(kind: str, inputs: dict[str, CheckpointRef], init: CheckpointRef | None = None, **fields) -> Stage:
    fields = {"name": kind.replace("_", "-"), "kind": kind, "steps": 100, "batch_size": 8, "eval_batches": 2, **fields}
    stage_spec = SPEC_CLASSES[kind](**fields)
    ctx = StageContext(
        run_id="test", rank=0, world_size=1, seed=0, device=torch.device("cpu"), autocast_dtype=None,
        model_spec=MODEL, stage=stage_spec, inputs=dict(inputs), init_checkpoint=init,
    )
    return STAGES[kind](ctx)


def train(stage: Stage, steps: int, lr: float, start: int = 0) -> list[StepResult]:
    """The harness's step loop without the harness: AdamW, clipping, after_step."""
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    results = []
    for i in range(start, start + steps):
        r = stage.step(i, i, dict(stage.ctx.stage.mixture))
        opt.zero_grad()
        r.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stage.after_step(r, i)
        results.append(r)
    return results


def save(stage: Stage, root: Path) -> CheckpointRef:
    """The stage's weights as a checkpoint folder, and the reference a worker would have reported."""
    d = root / stage.ctx.stage.name
    d.mkdir()
    torch.save(stage.model.state_dict(), d / "model.pt")
    (d / "manifest.json").write_text(json.dumps({"stage_kind": stage.kind, "model_config": MODEL.model_dump()}))
    return recorded(d)



def corrupt_ratio(stage: Stage, batches: range = range(1000, 1004)) -> float:
    """Loss on corrupted batches over loss on the same batches clean."""
    mixture = dict(stage.ctx.stage.mixture)
    with torch.no_grad():
        clean = sum(stage.step(i, i, mixture).loss.item() for i in batches)
        bad = sum(stage.step(i, i, mixture, corrupt=True).loss.item() for i in batches)
    return bad / clean


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def pretrained(root):
    stage = make_stage("pretrain", {})
    before = stage.evaluate()["val_loss"]
    results = train(stage, 60, lr=6e-3)
    return {"stage": stage, "before": before, "after": stage.evaluate()["val_loss"],
            "results": results, "path": save(stage, root)}


@pytest.fixture(scope="module")
def sft(root, pretrained):
    stage = make_stage("sft", {"pretrain": pretrained["path"]}, pretrained["path"])
    before = stage.evaluate()["val_loss"]
    train(stage, 30, lr=2e-3)
    return {"stage": stage, "before": before, "after": stage.evaluate()["val_loss"], "path": save(stage, root)}


@pytest.fixture(scope="module")
def reward_model(root, pretrained, sft):
    inputs = {"pretrain": pretrained["path"], "sft": sft["path"]}
    stage = make_stage("reward_model", inputs, sft["path"])
    train(stage, 40, lr=3e-3)
    return {"stage": stage, "eval": stage.evaluate(), "path": save(stage, root), "inputs": inputs}


def test_registry_covers_every_built_in_stage_kind():
    # custom and loop stages are a user's code (workers/usercode.py), never in the registry
    assert set(STAGES) == {k.value for k in StageKind} - {"custom", "loop"}
    assert all(cls.kind == kind for kind, cls in STAGES.items())


def test_pretrain_loss_falls_and_corrupted_batch_spikes(pretrained):
    first = sum(r.loss.item() for r in pretrained["results"][:5]) / 5
    last = sum(r.loss.item() for r in pretrained["results"][-5:]) / 5
    assert last < first - 1.0
    assert pretrained["after"] < pretrained["before"] - 1.0
    assert corrupt_ratio(pretrained["stage"]) >= 3.0


def test_pretrain_step_is_deterministic_across_instances():
    a, b = make_stage("pretrain", {}), make_stage("pretrain", {})
    ra, rb = a.step(5, 5, {"web": 1.0}), b.step(5, 5, {"web": 1.0})
    assert ra.loss.item() == rb.loss.item() and ra.tokens == 8 * MODEL.seq_len
    assert ra.loss.item() != a.step(6, 6, {"web": 1.0}).loss.item()


def test_anneal_starts_from_the_pretrained_weights_and_keeps_improving(pretrained):
    stage = make_stage("anneal", {"pretrain": pretrained["path"]}, pretrained["path"])
    assert stage.ctx.stage.mixture["curated"] > 0.5
    fresh = make_stage("anneal", {}).evaluate()["val_loss"]
    before = stage.evaluate()["val_loss"]
    assert before < fresh - 1.0
    train(stage, 10, lr=1e-3)
    assert stage.evaluate()["val_loss"] < before


def test_sft_lowers_held_out_loss_and_corrupted_batch_spikes(sft):
    assert sft["stage"].output_metric() == "val_loss"
    assert sft["after"] < sft["before"]
    assert corrupt_ratio(sft["stage"]) >= 3.0


def test_reward_model_prefers_chosen_on_held_out_pairs(reward_model):
    assert reward_model["eval"]["preference_accuracy"] > 0.6
    # swapped preference labels: the Bradley-Terry loss of a trained model jumps ~2.5-3x (its
    # margins are modest after 40 steps), enough for the spike detector (>= 1.5x and z >= 6)
    assert corrupt_ratio(reward_model["stage"]) >= 2.0


def test_dpo_learns_preferences_from_the_sft_reference(root, reward_model):
    stage = make_stage("dpo", reward_model["inputs"] | {"reward-model": reward_model["path"]}, reward_model["path"])
    assert torch.equal(stage.model.tok_emb.weight, stage.reference.tok_emb.weight)
    results = train(stage, 20, lr=2e-3)
    assert {"dpo_reward_margin", "preference_accuracy", "dpo_chosen_logprob"} <= set(results[-1].metrics)
    ev = stage.evaluate()
    assert ev["preference_accuracy"] > 0.5 and ev["dpo_reward_margin"] > 0
    assert corrupt_ratio(stage) >= 3.0


def test_ppo_keeps_kl_near_target_and_checkpoints_its_coefficient(reward_model):
    inputs = reward_model["inputs"] | {"reward-model": reward_model["path"]}
    stage = make_stage("ppo", inputs, reward_model["path"], kl_target=0.5, kl_coef=0.1, kl_horizon=50, response_len=12)
    assert stage.reference is not stage.model
    results = train(stage, 15, lr=2e-3)
    kls = [r.metrics["kl"] for r in results]
    assert {"reward_mean", "kl", "kl_coef"} <= set(results[-1].metrics)
    assert sum(kls) / len(kls) < 3 * 0.5 and stage.evaluate()["val_kl"] < 3 * 0.5
    assert stage.kl_coef != 0.1 and stage.extra_state()["kl_coef"] == stage.kl_coef
    # a healthy run raises none of the PPO update-health incidents
    assert not {f.kind for f in findings("ppo", results)} & PPO_HEALTH_KINDS
    assert corrupt_ratio(stage) >= 3.0

    again = make_stage("ppo", inputs, reward_model["path"], kl_target=0.5, response_len=12)
    again.model.load_state_dict(stage.model.state_dict())
    again.load_extra_state(stage.extra_state())
    with torch.no_grad():
        a, b = stage.step(50, 50, {}), again.step(50, 50, {})
    assert a.loss.item() == b.loss.item() and a.metrics == b.metrics


def test_kl_controller_moves_toward_target_and_is_clipped():
    assert kl_controller_update(0.1, kl=1.0, target=0.5, n_samples=10, horizon=50) == pytest.approx(0.1 * 1.04)
    assert kl_controller_update(0.1, kl=0.25, target=0.5, n_samples=10, horizon=50) == pytest.approx(0.1 * 0.96)
    assert kl_controller_update(0.1, kl=0.5, target=0.5, n_samples=10, horizon=50) == pytest.approx(0.1)


def test_missing_reference_is_reported_by_name(pretrained):
    stage_spec = S.PPOStage(name="ppo", kind="ppo", steps=1, reference="sft")
    ctx = StageContext(run_id="t", rank=0, world_size=1, seed=0, device=torch.device("cpu"), autocast_dtype=None,
                       model_spec=MODEL, stage=stage_spec, inputs={"pretrain": pretrained["path"]}, init_checkpoint=None)
    with pytest.raises(ValueError, match="'sft'"):
        find_input(ctx, "sft", "sft")
    with pytest.raises(ValueError, match="reward_model"):
        find_input(ctx, None, "reward_model")


def _rows(*tensors: torch.Tensor, pad: int) -> list[tuple[int, ...]]:
    """Each sequence without its padding, sorted: the samples a batch holds, whatever its layout."""
    return sorted(tuple(t for t in row.tolist() if t != pad) for x in tensors for row in x)


def test_post_training_stages_share_one_global_batch_across_ranks(monkeypatch, pretrained, sft, reward_model):
    """SFT, RM, DPO and PPO train at 2 ranks on exactly the samples 1 rank trains on: each rank
    takes its share of the global batch (so a checkpoint continues at another world size)."""
    import dataclasses

    import trainguard.workers.stages.dpo as dpo_mod
    import trainguard.workers.stages.reward_model as rm_mod
    import trainguard.workers.stages.sft as sft_mod

    seen: list[tuple[int, tuple]] = []

    def recording(module, name):
        real = getattr(module, name)

        def wrapper(*a, **kw):
            out = real(*a, **kw)
            seen.append((kw.get("world_size") or 1, out))
            return out
        monkeypatch.setattr(module, name, wrapper)

    recording(sft_mod, "sft_batch")
    recording(rm_mod, "preference_batch")
    recording(dpo_mod, "preference_batch")
    pad = BYTE_TOKENIZER.pad
    inputs = {"pretrain": pretrained["path"], "sft": sft["path"], "reward_model": reward_model["path"]}
    for kind, init in (("sft", pretrained["path"]), ("reward_model", sft["path"]), ("dpo", sft["path"])):
        base = make_stage(kind, inputs, init)
        by_world = {}
        for world in (1, 2):
            seen.clear()
            for rank in range(world):
                stage = STAGES[kind](dataclasses.replace(base.ctx, rank=rank, world_size=world))
                with torch.no_grad():
                    stage.step(5, 5, {})
            by_world[world] = [_rows(*out[:1] if kind == "sft" else (out[0], out[2]), pad=pad) for _, out in seen]
            assert {w for w, _ in seen} == {world}
        assert by_world[1][0] == sorted(r for rows in by_world[2] for r in rows), kind
    ppo = make_stage("ppo", inputs, sft["path"])
    one = ppo._prompts(5, 0)[0]
    halves = [STAGES["ppo"](dataclasses.replace(ppo.ctx, rank=r, world_size=2))._prompts(5, r)[0] for r in (0, 1)]
    assert _rows(one, pad=pad) == _rows(*halves, pad=pad)


# --------------------------------------------------------------------------- RLHF failure signals
#
# The real PPO and DPO stages pushed into each failure the watch knows, their per-step records
# (as the harness publishes them: step, loss and StepResult.metrics) fed to the supervisor's
# evaluation. Small rollouts (8 prompts, 8-token responses) keep each run to a few seconds.

PPO_HEALTH_KINDS = {"policy_ratio", "negative_kl", "entropy_collapse", "response_length", "value_loss_explosion"}


def findings(kind: str, results: list[StepResult]):
    from trainguard.service.domain.evaluate import WatchConfig, evaluate_stage

    records = [{"step": i + 1, "loss": r.loss.item(), **r.metrics} for i, r in enumerate(results)]
    return evaluate_stage(StageSignalsStub(kind, records), WatchConfig(), now=0.0)


class _ResponseScorer(torch.nn.Module):
    """A stand-in reward model scoring only the sampled response (the last `n` tokens)."""

    def __init__(self, n: int, score) -> None:
        super().__init__()
        self.n, self.score = n, score

    def forward(self, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.score(seq[:, -self.n :], valid[:, -self.n :]).float()


def _ppo(reward_model, scorer=None, **fields) -> Stage:
    fields = {"batch_size": 8, "response_len": 8, "kl_target": 0.5, "kl_coef": 0.1, **fields}
    stage = make_stage("ppo", reward_model["inputs"] | {"reward-model": reward_model["path"]}, reward_model["path"],
                       **fields)
    if scorer is not None:
        stage.reward_model = _ResponseScorer(fields["response_len"], scorer)
    return stage


def _kinds(kind: str, results) -> dict[str, dict]:
    return {f.kind: f.evidence for f in findings(kind, results)}


def test_ppo_learning_rate_far_too_high_drives_the_ratio_away_from_1(reward_model):
    stage = _ppo(reward_model, ppo_epochs=4)
    results = train(stage, 12, lr=2e-2)
    assert max(r.metrics["ppo_ratio_max"] for r in results) > 2.0
    assert results[0].metrics["ppo_ratio_mean"] == 1.0  # a rollout's first minibatch: nothing moved yet
    ev = _kinds("ppo", results)["policy_ratio"]
    assert ev["clip_fraction"] > 0.5


def test_ppo_sampling_off_policy_gives_a_negative_kl_estimate(reward_model):
    """Temperature 2.5: the responses are not the policy's samples, so log pi - log pi_ref over
    them is no KL estimate; once the policy leaves its reference it goes negative."""
    stage = _ppo(reward_model, temperature=2.5)
    results = train(stage, 16, lr=5e-4)
    assert min(r.metrics["kl"] for r in results) < -0.1
    kinds = _kinds("ppo", results)
    assert "negative_kl" in kinds and kinds["negative_kl"]["kl_median"] < -0.1


def test_ppo_exploiting_a_reward_model_collapses_entropy_and_hacks_the_reward(reward_model):
    """A reward model that counts spaces, no KL penalty and no ptx: the policy answers every
    prompt with spaces (entropy collapse), the reward rises while the KL leaves its budget
    (reward hacking), and the critic cannot follow the returns' new scale."""
    stage = _ppo(reward_model, lambda r, v: ((r == 32) & v).sum(1), kl_coef=0.0, ptx_coef=0.0, ppo_epochs=8,
                 minibatches=1)
    results = train(stage, 24, lr=3e-2)
    kinds = _kinds("ppo", results)
    assert {"entropy_collapse", "reward_hacking"} <= set(kinds), kinds.keys()
    assert kinds["entropy_collapse"]["score"] < 0.4
    assert kinds["reward_hacking"]["reward_during"] > kinds["reward_hacking"]["reward_before"]


def test_ppo_reward_model_preferring_terse_answers_collapses_the_response_length(reward_model):
    stage = _ppo(reward_model, lambda r, v: 16 - v.sum(1), kl_coef=0.0, ptx_coef=0.0, batch_size=16,
                 response_len=16, ppo_epochs=4, minibatches=1)
    results = train(stage, 16, lr=1e-2)
    ev = _kinds("ppo", results)["response_length"]
    assert ev["direction"] == "collapse" and ev["length_median"] < 0.5 * ev["length_start"]


def test_ppo_value_learning_rate_far_too_high_blows_the_value_loss_up(reward_model):
    stage = _ppo(reward_model, value_lr=1.0)
    results = train(stage, 8, lr=5e-4)
    kinds = _kinds("ppo", results)
    assert "value_loss_explosion" in kinds
    assert kinds["value_loss_explosion"]["value_loss_median"] > 10 * results[0].metrics["value_loss"]


def test_ppo_resumes_mid_rollout_bit_for_bit(reward_model):
    """Model, optimizer and extra_state() (rollout buffer and position, value head and its
    optimizer, KL coefficient) restored after step 3, inside a 4-step rollout: the next three
    steps give the same weights as an uninterrupted run."""
    def run(stage: Stage, steps: range, opt_state=None) -> torch.optim.Optimizer:
        params = [p for p in stage.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for i in steps:
            r = stage.step(i, i, {})
            opt.zero_grad()
            r.loss.backward()
            opt.step()
            stage.after_step(r, i)
        return opt

    import copy
    import io

    a = _ppo(reward_model)
    opt = run(a, range(3))
    assert a.buffer is not None and a.buffer["pos"] == 3
    blob = io.BytesIO()
    torch.save({"model": a.model.state_dict(), "opt": opt.state_dict(), "extra": a.extra_state()}, blob)
    run(a, range(3, 6), copy.deepcopy(opt.state_dict()))
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    b = _ppo(reward_model)
    b.model.load_state_dict(saved["model"])
    b.load_extra_state(saved["extra"])
    run(b, range(3, 6), saved["opt"])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.value_head.weight, b.value_head.weight) and a.kl_coef == b.kl_coef


def test_dpo_with_a_beta_far_too_small_pushes_the_chosen_log_probs_down_while_the_margin_grows(reward_model):
    """beta 0.01 (a tenth of the default) and epochs over the same preference pairs: the loss
    keeps widening the margin by pushing both responses down, the chosen one too."""
    stage = make_stage("dpo", reward_model["inputs"], reward_model["path"], beta=0.01, batch_size=4)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    results = []
    # 26 steps were enough on one CPU; on another (AVX2, same torch) the chosen log-prob wandered
    # for 40 before its rolling median stayed under the floor: 60 leave room for either
    for i in range(60):
        r = stage.step(0, i, {})  # the same batch every step
        opt.zero_grad()
        r.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        results.append(r)
    m = [r.metrics for r in results]
    assert m[-1]["dpo_rejected_logprob"] < m[-1]["dpo_chosen_logprob"] < m[0]["dpo_chosen_logprob"]
    assert m[-1]["dpo_reward_margin"] > m[0]["dpo_reward_margin"]
    ev = _kinds("dpo", results)["dpo_collapse"]
    assert ev["chosen_median"] < ev["threshold"] and ev["margin_median"] > ev["margin_start"]
