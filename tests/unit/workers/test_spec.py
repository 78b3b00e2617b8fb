"""Pipeline specs: bad input fails before anything starts, with the field named."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from trainguard.workers.spec import SpecError, load_pipeline, parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
BASE = {
    "name": "t",
    "stages": [
        {"name": "pretrain", "kind": "pretrain", "steps": 10},
        {"name": "sft", "kind": "sft", "steps": 5, "faults": [{"kind": "nan", "at_step": 2}]},
    ],
}


def with_change(path: str, value: object) -> dict:
    """BASE with the value at dotted `path` replaced (value None deletes it)."""
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


def test_base_spec_is_valid():
    spec = parse_pipeline(BASE)
    assert [s.kind for s in spec.stages] == ["pretrain", "sft"]


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("stages.1.kind", "rlhf", "stages.1"),
        ("stages.0.steps", -5, "stages.0.pretrain.steps"),
        ("stages.0.steps", None, "stages.0.pretrain.steps"),
        ("stages.1.faults.0.kind", "meteor", "stages.1.sft.faults.0.kind"),
        ("stages.1.faults.0.at_step", 99, "faults.0.at_step"),
        ("stages.0.mixture", {"nowhere": 1.0}, "stages.0.mixture"),
        ("model", {"d_model": 30, "n_head": 4}, "model.d_model"),
    ],
    ids=["unknown-kind", "negative-steps", "missing-steps", "unknown-fault", "fault-past-end", "unknown-source", "heads"],
)
def test_invalid_field_raises_spec_error_naming_it(path, value, named):
    with pytest.raises(SpecError, match=named.replace(".", r"\.")):
        parse_pipeline(with_change(path, value))


def test_first_stage_must_be_pretrain():
    with pytest.raises(SpecError, match="stages.0"):
        parse_pipeline({"name": "t", "stages": [{"name": "sft", "kind": "sft", "steps": 5}]})


def test_sft_or_a_reward_model_may_start_from_a_pretrained_hf_folder():
    hf = {"seq_len": 32, "hf": {"path": "/data/models/tiny"}}
    for kind in ("sft", "reward_model"):
        spec = parse_pipeline({"name": "t", "model": hf, "stages": [{"name": "first", "kind": kind, "steps": 5}]})
        assert spec.stages[0].kind == kind
    with pytest.raises(SpecError, match=r"stages\.0 \(dpo\) needs an earlier stage"):  # DPO needs a reference
        parse_pipeline({"name": "t", "model": hf, "stages": [{"name": "first", "kind": "dpo", "steps": 5}]})
    fresh = {"seq_len": 32, "hf": {"config": {"architecture": "llama"}}}  # random weights: nothing to start from
    with pytest.raises(SpecError, match=r"stages\.0 \(sft\)"):
        parse_pipeline({"name": "t", "model": fresh, "stages": [{"name": "first", "kind": "sft", "steps": 5}]})


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-faults.yaml"])
def test_examples_run_all_six_stages(name):
    spec = load_pipeline(EXAMPLES / name)
    assert [s.kind for s in spec.stages] == ["pretrain", "anneal", "sft", "reward_model", "ppo", "dpo"]
    assert spec.stages[0].world_size == 2 and all(s.world_size <= 2 for s in spec.stages)


def test_fault_example_injects_the_default_schedule():
    faults = {(s.kind, f.kind.value) for s in load_pipeline(EXAMPLES / "tiny-faults.yaml").stages for f in s.faults}
    assert ("pretrain", "loss_spike") in faults and ("sft", "nan") in faults
    assert faults & {("pretrain", "worker_crash"), ("anneal", "worker_crash")}
    assert faults & {("dpo", "hang"), ("reward_model", "hang")}
    assert not any(s.faults for s in load_pipeline(EXAMPLES / "tiny.yaml").stages)
