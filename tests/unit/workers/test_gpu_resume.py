"""Resume and rollback on a CUDA rank, on a CPU-only host (issue: GPU honesty, item 1).

The checkpoint is loaded onto the CPU: the RNG generators take CPU byte tensors only, and
load_state_dict moves weights and optimizer state to the parameters' device itself. A CUDA
rank is faked here: the stage context says cuda:0 while the tiny model stays on the CPU,
and the few torch.cuda calls the harness makes for such a rank are replaced by fakes that
record what they were given. Loading onto ctx.device (the old behaviour) fails here, as it
failed on every GPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trainguard.workers import model as model_module
from trainguard.workers.contract import Control, ControlKind
from trainguard.workers.model import build_gpt, load_weights
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.spec import ModelSpec

from ._tiny import TinyStage, recorded, tiny_spec

torch.set_num_threads(1)
FAKE_CUDA = torch.device("cuda", 0)


class FakeCudaRng:
    """Stands in for torch.cuda's generator calls on a CPU-only build; records its arguments."""

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)
        self.set_calls: list[tuple[torch.device, torch.dtype, object]] = []
        self.synced: list[object] = []

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.state.clone()  # torch returns a CPU ByteTensor

    def set_rng_state(self, new_state: torch.Tensor, device="cuda") -> None:
        self.set_calls.append((new_state.device, new_state.dtype, device))

    def synchronize(self, device=None) -> None:
        self.synced.append(device)


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCudaRng:
    fake = FakeCudaRng()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    return fake


@pytest.fixture
def cpu_rng_calls(monkeypatch) -> list[tuple[torch.device, torch.dtype]]:
    """torch.set_rng_state, recording the device and dtype of what it is given."""
    calls: list[tuple[torch.device, torch.dtype]] = []
    real = torch.set_rng_state

    def recording(new_state: torch.Tensor) -> None:
        calls.append((new_state.device, new_state.dtype))
        real(new_state)

    monkeypatch.setattr(torch, "set_rng_state", recording)
    return calls


def _cuda_rank_harness(spec, state_dir, **kw) -> Harness:
    ctx = dataclasses.replace(make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu")),
                              device=FAKE_CUDA)
    return Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=state_dir, **kw)


def _stop_at(k: int):
    def hook(h: Harness) -> None:
        if h.step == k:
            h.inbox.put(Control(ControlKind.STOP, seq=1))
    return hook


def test_resume_on_a_cuda_rank_gives_the_generators_cpu_byte_tensors(tmp_path, fake_cuda, cpu_rng_calls):
    spec = tiny_spec(steps=10)
    first = _cuda_rank_harness(spec, tmp_path, on_step=_stop_at(5))
    out = first.run()
    assert out["state"] == "stopped"

    second = _cuda_rank_harness(spec, tmp_path, resume_from=first.own[out["last_checkpoint"]])
    assert second.step == 5
    assert cpu_rng_calls == [(torch.device("cpu"), torch.uint8)]
    # the CUDA generator of this rank's device, restored from a CPU byte tensor
    assert fake_cuda.set_calls == [(torch.device("cpu"), torch.uint8, FAKE_CUDA)]
    # AdamW's `step` stays a CPU tensor (capturable=False); the rest follows the parameters
    for state in second.optimizer.state.values():
        assert state["step"].device.type == "cpu"
        assert state["exp_avg"].device == next(second.stage.model.parameters()).device
    assert second.run()["state"] == "finished"


def test_rollback_on_a_cuda_rank_loads_onto_the_cpu(tmp_path, fake_cuda, cpu_rng_calls):
    rolled = []

    def hook(h: Harness) -> None:
        if h.step == 7 and not rolled:
            rolled.append(True)
            h.writer.wait()
            ref = next(r for p, r in h.own.items() if p.endswith("step-00000005"))
            h.inbox.put(Control(ControlKind.ROLLBACK, 1, {"checkpoint": ref.to_dict(), "skip": [[5, 7]]}))

    h = _cuda_rank_harness(tiny_spec(steps=10), tmp_path, on_step=hook)
    assert h.run()["state"] == "finished" and rolled
    assert cpu_rng_calls == [(torch.device("cpu"), torch.uint8)]
    assert fake_cuda.set_calls == [(torch.device("cpu"), torch.uint8, FAKE_CUDA)]


def test_a_cuda_rank_checkpoints_only_its_own_generator(tmp_path, fake_cuda):
    h = _cuda_rank_harness(tiny_spec(steps=5), tmp_path)
    h.run()
    from trainguard.workers.runtime.checkpoint import load_checkpoint

    rng = load_checkpoint(h.own[h.final_checkpoint])["rng"][0]
    assert len(rng["cuda"]) == 1 and torch.equal(rng["cuda"][0], fake_cuda.state)


def test_a_cpu_rank_never_touches_cuda_generators(tmp_path, fake_cuda, cpu_rng_calls):
    spec = tiny_spec(steps=6)
    ctx = make_context(spec, "pretrain", run_id="run1", device=torch.device("cpu"))
    first = Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=tmp_path,
                    on_step=_stop_at(5))
    out = first.run()
    Harness(TinyStage(ctx), spec=spec, stage_name="pretrain", run_id="run1", state_dir=tmp_path,
            resume_from=first.own[out["last_checkpoint"]])
    assert fake_cuda.set_calls == [] and fake_cuda.synced == []
    assert cpu_rng_calls == [(torch.device("cpu"), torch.uint8)]


def test_load_weights_maps_the_checkpoint_to_the_cpu(tmp_path, monkeypatch):
    spec = ModelSpec(n_layer=1, n_head=1, d_model=16, seq_len=16)
    torch.save(build_gpt(spec, seed=1).state_dict(), tmp_path / "model.pt")
    (tmp_path / "manifest.json").write_text("{}")
    seen = []
    real = model_module.load_model_state

    def spy(ref, map_location="cpu"):
        seen.append(map_location)
        return real(ref, map_location=map_location)

    monkeypatch.setattr(model_module, "load_model_state", spy)
    target = build_gpt(spec, seed=2)
    load_weights(target, recorded(tmp_path))
    assert seen == ["cpu"]
    assert torch.equal(target.tok_emb.weight, build_gpt(spec, seed=1).tok_emb.weight)
