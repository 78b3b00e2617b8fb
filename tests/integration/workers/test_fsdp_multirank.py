"""`parallel.strategy` and checkpoint formats on 2 gloo ranks (torch.multiprocessing on
localhost, no Ray): the tiny GPT trained by the harness with FSDP2 matches the default 2-rank
run (hand-made flat all-reduce) within float tolerance, DDP matches it bitwise, and an FSDP2
run stopped at step k and resumed from its checkpoint ends bitwise equal to an uninterrupted
FSDP2 run (with and without a skip list), with DCP checkpoints (the default under FSDP2) and
with whole torch files; an in-process rollback with a skip list under FSDP2 + DCP equals a run
that skipped those batches from the start; a DCP checkpoint with a flipped byte in a shard or
without its manifest is refused on every rank, naming the file; and a DCP checkpoint saved at
2 ranks resumes at 1 rank (in the test process) on exactly the same global samples, with the
same next-step loss. One spawn serves every test (module fixture)."""
from __future__ import annotations

import json
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from trainguard.workers.contract import CheckpointRef, Control, ControlKind
from trainguard.workers.model import build_gpt, lm_loss
from trainguard.workers.spec import parse_pipeline
from trainguard.workers.data import sample_indices
from trainguard.workers.stages.base import Stage, StepResult
from trainguard.workers.stages.pretrain import PretrainStage

from tests.support import spawn_gloo_ranks

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

WORLD = 2
STEPS = 12
STOP_AT = 7
VOCAB = 64


class GPTStage(Stage):
    """The built-in GPT on random token windows, deterministic per (seed, batch index, rank)."""

    kind = "pretrain"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._model = build_gpt(ctx.model_spec, ctx.seed, ctx.device)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _tokens(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, VOCAB, (self.ctx.stage.batch_size // self.ctx.world_size, self.ctx.model_spec.seq_len + 1),
                             generator=g)

    def step(self, batch_index, step, mixture, corrupt=False) -> StepResult:
        x = self._tokens(self.ctx.seed * 1_000_003 + batch_index * 31 + self.ctx.rank)
        return StepResult(loss=lm_loss(self._model, x[:, :-1], x[:, 1:]), tokens=x[:, :-1].numel())

    def evaluate(self) -> dict[str, float]:
        x = self._tokens(999)
        return {"val_loss": float(lm_loss(self._model, x[:, :-1], x[:, 1:]))}


def spec_for(strategy: str, faults=(), fmt: str = "auto"):
    # dropout on: the global RNG is used in every step, so its restore is part of exact resume
    return parse_pipeline({
        "name": "fsdp", "seed": 5, "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "dropout": 0.1},
        "checkpoint": {"every": 5, "keep_last": 5, "format": fmt},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": STEPS, "world_size": WORLD, "batch_size": 8,
                    "lr": 3e-3, "warmup_steps": 2, "eval_every": 6, "parallel": {"strategy": strategy},
                    "faults": list(faults)}]})


def _run(d, rank: int, strategy: str, state_dir: Path, *, skip=(), stop_at: int | None = None,
         resume_from: CheckpointRef | None = None, faults=(), fmt: str = "auto", rollback=None):
    """`rollback`: (at step, to step, skip ranges): a ROLLBACK control to rank 0's checkpoint."""
    import torch.distributed as dist

    from trainguard.workers.runtime.harness import Harness, make_context

    spec = spec_for(strategy, faults, fmt)
    torch.manual_seed(1000 + rank)  # dropout draws from the global RNG: every run starts from the same state
    ctx = make_context(spec, "pretrain", run_id="r", rank=rank, world_size=WORLD, device=torch.device("cpu"))

    def hook(h) -> None:
        if stop_at is not None and h.step == stop_at:
            h.inbox.put(Control(ControlKind.STOP, seq=1))
        if rollback is not None and h.step == rollback[0]:
            h.writer.wait()
            ref = [next(r for r in h.own.values() if r.path.endswith(f"step-{rollback[1]:08d}")).to_dict()
                   if rank == 0 else None]
            dist.broadcast_object_list(ref, src=0)
            h.inbox.put(Control(ControlKind.ROLLBACK, seq=1, payload={"checkpoint": ref[0], "skip": rollback[2]}))

    h = Harness(GPTStage(ctx), spec=spec, stage_name="pretrain", run_id="r", state_dir=state_dir, dist=d,
                skip=skip, resume_from=resume_from, on_step=hook)
    out = h.run()
    return h, out


def _hf_reward_model(d, rank: int) -> dict | None:
    """An HF reward model (Llama decoder layers as FSDP2 units; its lm_head never gets a
    gradient) trains 2 steps, and its full state dicts round-trip through a load."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from trainguard.workers.runtime.distributed import full_state_dicts, load_full_state_dicts, transformer_blocks, wrap_model
    from trainguard.workers.spec import ModelSpec

    import transformers

    from trainguard.workers.hf import HFCausalLM, HFRewardModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    rm = HFRewardModel(HFCausalLM(transformers.LlamaForCausalLM(cfg), ModelSpec(seq_len=16),
                                  SimpleNamespace(bos=1, eos=2, pad=0, sep=3)))
    keys = list(rm.state_dict())
    n_units = len(transformer_blocks(rm))
    wrap_model(rm, "fsdp", d)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    x = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        rm(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(rm.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
    full = [full_state_dicts(rm, opt)]
    dist.broadcast_object_list(full, src=0)
    load_full_state_dicts(rm, opt, *full[0])
    again = full_state_dicts(rm, opt)
    if rank != 0:
        return None
    m0, o0 = full[0]
    m1, o1 = again
    return {"units": n_units, "keys_same": list(m0) == keys,
            "round_trip_bitwise": all(torch.equal(m0[k], m1[k]) for k in m0)
            and all(torch.equal(torch.as_tensor(v), torch.as_tensor(o1["state"][i][n]))
                    for i, st in o0["state"].items() for n, v in st.items()),
            "lm_head_has_state": any(k == keys.index("backbone.hf.lm_head.weight") for k in o0["state"])}


def _refusals(d, rank: int, o: Path, ref: dict) -> dict[str, str]:
    """Copies of the DCP checkpoint `ref` with a byte flipped in each rank's shard and with
    the manifest gone: loading each fails on every rank (no rank left waiting in a collective)
    with the error naming the file."""
    import shutil

    import torch.distributed as dist

    from trainguard.workers.runtime.checkpoint import CheckpointError
    from trainguard.workers.runtime.faults import corrupt_file

    out: dict[str, str] = {}
    src = Path(ref["path"])
    for case in ("__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"):
        dst = o / "refused" / case.strip("_.") / src.name
        if rank == 0:
            shutil.copytree(src, dst)
            if case == "manifest.json":
                (dst / case).unlink()
            else:
                corrupt_file(str(dst / case))
        dist.barrier()
        try:
            _run(d, rank, "fsdp", o / "refused" / case.strip("_."),
                 resume_from=CheckpointRef.from_dict({**ref, "path": str(dst)}))
            out[case] = "loaded"
        except CheckpointError as e:
            out[case] = f"{type(e).__name__}: {e}"
    return out


def _two_rank_pretrain(d, rank: int, o: Path) -> dict:
    """The real pretrain stage (data by global sample index) on 2 ranks with FSDP2 + DCP, no
    dropout: each rank's samples and loss per step, and the reference of the step-5 checkpoint."""
    import torch.distributed as dist

    from trainguard.workers.runtime.harness import Harness, make_context

    spec = world_size_spec(WORLD)
    ctx = make_context(spec, "pretrain", run_id="ws", rank=rank, world_size=WORLD, device=torch.device("cpu"))
    stage = RecordingPretrain(ctx)
    h = Harness(stage, spec=spec, stage_name="pretrain", run_id="ws", state_dir=o, dist=d)
    res = h.run()
    assert res["state"] == "finished", res
    ref = [next(r for r in h.own.values() if r.path.endswith("step-00000005")).to_dict() if rank == 0 else None]
    dist.broadcast_object_list(ref, src=0)
    per_rank: list = [None] * WORLD
    dist.all_gather_object(per_rank, {"samples": stage.seen, "losses": [r["loss"] for r in h.exporter.history(0)]})
    return {"ref": ref[0], "ranks": per_rank, "state_dir": str(o)}


def world_size_spec(world: int):
    return parse_pipeline({
        "name": "ws", "seed": 7, "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 16, "dropout": 0.0},
        "checkpoint": {"every": 5, "keep_last": 5},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 8, "world_size": world, "batch_size": 8,
                    "lr": 3e-3, "warmup_steps": 2, "eval_every": 100, "eval_batches": 1,
                    "parallel": {"strategy": "fsdp"}}]})


class RecordingPretrain(PretrainStage):
    """The pretrain stage, recording the global sample indices each step trained on."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.seen: list[tuple[int, list[int]]] = []

    def step(self, batch_index, step, mixture, corrupt=False, samples=None) -> StepResult:
        if samples is None:
            samples = sample_indices(batch_index, self.ctx.rank, self.ctx.world_size, self.ctx.stage.batch_size)
        self.seen.append((batch_index, list(samples)))
        return super().step(batch_index, step, mixture, corrupt, samples=samples)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from trainguard.workers.runtime.distributed import Dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    d = Dist.init(rank=rank, world_size=WORLD, addr="127.0.0.1", port=port, device=torch.device("cpu"), timeout_s=60)
    o = Path(out)
    results: dict[str, dict] = {}
    # fsdp_nan: the first two steps are non-finite (guard: no optimizer step), so the stop at
    # step 2 checkpoints an optimizer without state
    nan = [{"kind": "nan", "at_step": 0, "duration": 2, "rank": 1}]
    for name, strategy, skip, faults, stop_at, fmt in [
            ("none", "none", (), (), 0, "auto"), ("ddp", "ddp", (), (), 0, "auto"),
            ("fsdp", "fsdp", (), (), STOP_AT, "auto"), ("fsdp_skip", "fsdp", [[3, 6]], (), STOP_AT, "auto"),
            ("fsdp_nan", "fsdp", (), nan, 2, "auto"), ("fsdp_torch", "fsdp", (), (), STOP_AT, "torch"),
            ("fsdp_skip_late", "fsdp", [[5, 8]], (), 0, "auto")]:
        h, res = _run(d, rank, strategy, o / name, skip=skip, faults=faults, fmt=fmt)
        assert res["state"] == "finished", res
        losses = [r["loss"] for r in h.exporter.history(0)]
        norms = [r["grad_norm"] for r in h.exporter.history(0)]
        results[name] = {"losses": losses, "grad_norms": norms, "final": res["output_checkpoint"],
                         "format": h.ckpt_format}
        if strategy == "fsdp" and rank == 0:
            from torch.distributed.fsdp import FSDPModule
            assert isinstance(h.stage.model, FSDPModule)
        if strategy != "fsdp" or not stop_at:
            continue
        # interrupted at STOP_AT, resumed from the stop checkpoint (every rank loads the same ref)
        h1, r1 = _run(d, rank, strategy, o / f"{name}_b", skip=skip, stop_at=stop_at, faults=faults, fmt=fmt)
        assert r1["state"] == "stopped" and r1["step"] == stop_at, r1
        refs = [h1.own[r1["last_checkpoint"]].to_dict() if rank == 0 else None]
        dist.broadcast_object_list(refs, src=0)
        h2, r2 = _run(d, rank, strategy, o / f"{name}_b", skip=skip, resume_from=CheckpointRef.from_dict(refs[0]),
                      faults=faults, fmt=fmt)
        assert r2["state"] == "finished" and h2.step == STEPS
        results[name]["resumed_final"] = r2["output_checkpoint"]
        results[name]["resumed_losses"] = ([r["loss"] for r in h1.exporter.history(0)]
                                           + [r["loss"] for r in h2.exporter.history(0)])
        if name == "fsdp":
            results["refused"] = _refusals(d, rank, o, refs[0])
    # in-process rollback under FSDP2 + DCP at step 9 to the checkpoint of step 5, skipping
    # batches 5-7 (trained once, before the rollback): the same as skipping them from the start
    h, res = _run(d, rank, "fsdp", o / "fsdp_rollback", rollback=(9, 5, [[5, 8]]))
    assert res["state"] == "finished" and h.step == STEPS, res
    results["fsdp_rollback"] = {"final": res["output_checkpoint"], "batches": [r["batch_index"] for r in h.exporter.history(0)],
                                "losses": [r["loss"] for r in h.exporter.history(0)]}
    results["world_size"] = _two_rank_pretrain(d, rank, o / "ws")
    results["hf"] = _hf_reward_model(d, rank)
    if rank == 0:
        (o / "results.json").write_text(json.dumps(results))
    dist.barrier()
    d.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return spawn_gloo_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2"))


def _results(d: Path) -> dict:
    return json.loads((d / "results.json").read_text())


def _state(d: Path, folder: str) -> dict:
    """The model and optimizer state of a checkpoint folder, read without hash checks (tests
    only), in the torch format's shape: a DCP checkpoint's optimizer state is keyed by
    parameter name, mapped back to the optimizer's ids through its param groups."""
    p = Path(folder)
    if json.loads((p / "manifest.json").read_text()).get("format") != "dcp":
        return {"model": torch.load(p / "model.pt", weights_only=True),
                "optim": torch.load(p / "optimizer.pt", weights_only=True)}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(p, p.parent / f"{p.name}.pt")
    train = torch.load(p.parent / f"{p.name}.pt", weights_only=False)["train"]
    names = [n for g in train["optimizer"]["param_groups"] for n in g["params"]]
    return {"model": train["model"], "optim": {"state": {names.index(n): s for n, s in train["optimizer"]["state"].items()}}}


def _flat(st: dict) -> dict[str, torch.Tensor]:
    out = {f"m.{k}": v for k, v in st["model"].items()}
    for pid, s in st["optim"]["state"].items():
        for k, v in s.items():
            out[f"o.{pid}.{k}"] = torch.as_tensor(v)
    return out


def test_fsdp2_guard_skipped_the_non_finite_steps_on_every_rank(two_ranks):
    r = _results(two_ranks)["fsdp_nan"]
    assert len(r["losses"]) == STEPS
    assert all(n != n for n in r["grad_norms"][:2])  # rank 1's NaN reached every rank's gradients
    assert all(n == n for n in r["grad_norms"][2:])


def _bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(120)
def test_fsdp2_loss_matches_the_unsharded_two_rank_run(two_ranks):
    r = _results(two_ranks)
    none, fsdp = r["none"], r["fsdp"]
    assert len(none["losses"]) == len(fsdp["losses"]) == STEPS
    assert fsdp["losses"] == pytest.approx(none["losses"], rel=1e-5, abs=1e-6)
    assert fsdp["grad_norms"] == pytest.approx(none["grad_norms"], rel=1e-5, abs=1e-6)
    a, b = _flat(_state(two_ranks, none["final"])), _flat(_state(two_ranks, fsdp["final"]))
    assert a.keys() == b.keys()  # the same checkpoint format: model keys and optimizer ids
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


@pytest.mark.timeout(120)
def test_ddp_matches_the_hand_made_all_reduce_bitwise(two_ranks):
    r = _results(two_ranks)
    assert r["ddp"]["losses"] == r["none"]["losses"]
    assert _bitwise(_flat(_state(two_ranks, r["none"]["final"])), _flat(_state(two_ranks, r["ddp"]["final"])))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["fsdp", "fsdp_skip", "fsdp_nan"])
def test_fsdp2_resume_from_stop_is_bitwise_equal_to_uninterrupted(two_ranks, name):
    r = _results(two_ranks)[name]
    assert json.dumps(r["resumed_losses"]) == json.dumps(r["losses"])  # NaN included
    assert _bitwise(_flat(_state(two_ranks, r["final"])), _flat(_state(two_ranks, r["resumed_final"])))


@pytest.mark.timeout(120)
def test_fsdp2_wraps_an_hf_reward_model_and_round_trips_its_full_state(two_ranks):
    r = _results(two_ranks)["hf"]
    assert r == {"units": 2, "keys_same": True, "round_trip_bitwise": True, "lm_head_has_state": False}


@pytest.mark.timeout(120)
def test_fsdp2_checkpoints_are_dcp_by_default_and_torch_files_on_request(two_ranks):
    r = _results(two_ranks)
    assert r["fsdp"]["format"] == "dcp" and r["fsdp_torch"]["format"] == "torch" and r["none"]["format"] == "torch"
    files = {p.name for p in Path(r["fsdp"]["final"]).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json", "rng.pt", "extra.pt", "state.json"} <= files
    assert "model.pt" not in files
    assert "model.pt" in {p.name for p in Path(r["fsdp_torch"]["final"]).iterdir()}


@pytest.mark.timeout(120)
def test_fsdp2_rollback_with_a_skip_list_equals_skipping_from_the_start(two_ranks):
    r = _results(two_ranks)
    rb, late = r["fsdp_rollback"], r["fsdp_skip_late"]
    assert rb["batches"] == list(range(9)) + [8, 9, 10, 11, 12, 13, 14]  # rolled back to 5, 5-7 skipped
    assert rb["losses"][:5] + rb["losses"][9:] == late["losses"]
    assert _bitwise(_flat(_state(two_ranks, late["final"])), _flat(_state(two_ranks, rb["final"])))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json"])
def test_a_dcp_checkpoint_with_a_flipped_byte_or_no_manifest_is_refused_naming_the_file(two_ranks, case):
    message = _results(two_ranks)["refused"][case]
    assert message != "loaded"
    assert case in message
    want = "CheckpointIncomplete" if case == "manifest.json" else "CheckpointCorrupt"
    assert message.startswith(want), message


@pytest.mark.timeout(120)
def test_a_two_rank_dcp_checkpoint_resumes_at_one_rank_on_the_same_global_samples(two_ranks, tmp_path):
    from trainguard.workers.runtime.harness import Harness, make_context

    ws = _results(two_ranks)["world_size"]
    spec = world_size_spec(1)
    ctx = make_context(spec, "pretrain", run_id="ws", rank=0, world_size=1, device=torch.device("cpu"))
    stage = RecordingPretrain(ctx)

    def stop_after_one(h) -> None:
        h.inbox.put(Control(ControlKind.STOP, seq=1))

    h = Harness(stage, spec=spec, stage_name="pretrain", run_id="ws", state_dir=tmp_path,
                resume_from=CheckpointRef.from_dict(ws["ref"]), on_step=stop_after_one)
    assert h.step == 5 and h.cursor.next_index == 5
    res = h.run()
    assert res["state"] == "stopped" and h.step == 6
    [(batch, samples)] = stage.seen
    r0, r1 = ws["ranks"]
    (b0, s0), (b1, s1) = r0["samples"][5], r1["samples"][5]  # the 2-rank run's step 6
    assert batch == b0 == b1 == 5
    assert samples == s0 + s1 == list(range(40, 48))  # global batch 5 of size 8, whole, in order
    # the mean over 8 samples at one rank = the mean of the two ranks' means over 4 each
    one_rank_loss = h.exporter.history(0)[-1]["loss"]
    assert one_rank_loss == pytest.approx((r0["losses"][5] + r1["losses"][5]) / 2, rel=1e-5)
