"""`parallel.strategy` (none|ddp|fsdp) in one process: the spec option, the FSDP2 units
(transformer blocks), and world size 1 (every strategy is the default path, bitwise).
The 2-rank FSDP2/DDP runs are in tests/integration/workers/test_fsdp_multirank.py."""
from __future__ import annotations

import pytest
import torch

from trainguard.workers.model import build_gpt, build_reward_model
from trainguard.workers.runtime.distributed import Dist, is_sharded, transformer_blocks, wrap_model
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.spec import ModelSpec, SpecError, parse_pipeline

from ._tiny import TinyStage, tiny_spec

torch.set_num_threads(1)


def _pipeline(parallel) -> dict:
    st = {"name": "pretrain", "kind": "pretrain", "steps": 4}
    if parallel is not None:
        st["parallel"] = parallel
    return {"name": "p", "stages": [st]}


def test_parallel_defaults_to_none_and_accepts_ddp_and_fsdp():
    assert parse_pipeline(_pipeline(None)).stages[0].parallel.strategy == "none"
    for s in ("none", "ddp", "fsdp"):
        assert parse_pipeline(_pipeline({"strategy": s})).stages[0].parallel.strategy == s


@pytest.mark.parametrize("bad, field", [({"strategy": "zero3"}, "stages.0.pretrain.parallel.strategy"),
                                        ({"strategy": "fsdp", "shards": 2}, "stages.0.pretrain.parallel.shards"),
                                        ("fsdp", "stages.0.pretrain.parallel")])
def test_a_bad_parallel_option_names_the_field(bad, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_pipeline(_pipeline(bad))


def test_transformer_blocks_are_the_gpt_blocks_also_inside_a_reward_model():
    spec = ModelSpec(n_layer=3, n_head=1, d_model=8, seq_len=8)
    gpt = build_gpt(spec, 0)
    assert transformer_blocks(gpt) == list(gpt.blocks)
    rm = build_reward_model(spec, 0)
    assert transformer_blocks(rm) == list(rm.backbone.blocks)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="parallel.strategy"):
        wrap_model(torch.nn.Linear(2, 2), "zero3", Dist())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_world_size_one_is_the_default_path_bitwise(tmp_path, strategy):
    """At world size 1 nothing is wrapped: the run is the default one, bit for bit."""
    def run(s: str, d):
        spec = tiny_spec(steps=8, parallel={"strategy": s})
        torch.manual_seed(0)
        ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"))
        h = Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=d)
        h.run()
        return h

    a, b = run("none", tmp_path / "a"), run(strategy, tmp_path / "b")
    assert not is_sharded(b.stage.model) and not b.grads_averaged_in_backward
    assert [r["loss"] for r in a.exporter.history(0)] == [r["loss"] for r in b.exporter.history(0)]
    sa, sb = a.stage.model.state_dict(), b.stage.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transformer_blocks_of_an_hf_model_are_its_decoder_layers():
    import transformers
    from types import SimpleNamespace

    from trainguard.workers.hf import HFCausalLM

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    hf = transformers.LlamaForCausalLM(cfg)
    lm = HFCausalLM(hf, ModelSpec(seq_len=16), SimpleNamespace(bos=1, eos=2, pad=0, sep=3))
    assert transformer_blocks(lm) == list(hf.model.layers)
