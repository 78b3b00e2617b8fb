"""User code in the step loop, in-process (no Ray): a `kind: custom` stage from its own file and a
`kind: loop` loop through the loop API (workers/runtime/loop.py) get the harness's guard —
faults, the skip list, rollback with an exact resume, the LR schedule and multiplier — and
entrypoints are refused with a message that names what is wrong."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from trainguard.workers.contract import CheckpointRef, Control, ControlKind
from trainguard.workers.runtime.harness import Harness, make_context
from trainguard.workers.runtime.loop import Guarded, LoopError
from trainguard.workers.spec import SpecError, parse_pipeline
from trainguard.workers.usercode import (UserCode, UserCodeError, check_entrypoints, entrypoint_refusal,
                                         load_entrypoint)

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
CUSTOM = UserCode(modules=("regression_stage",), paths=(str(EXAMPLES / "custom_stage"),))
LOOP = UserCode(modules=("charlm",), paths=(str(EXAMPLES / "own_loop"),))


def _spec(kind: str, entrypoint: str, *, steps: int = 12, faults: list[dict[str, Any]] | None = None,
          **stage: Any):
    st = {"name": "s", "kind": kind, "entrypoint": entrypoint, "steps": steps, "batch_size": 8, "lr": 1e-2,
          "warmup_steps": 2, "eval_every": 100, "faults": faults or [], **stage}
    return parse_pipeline({"name": "uc", "seed": 5, "checkpoint": {"every": 4, "keep_last": 10}, "stages": [st]})


def _custom(spec, state_dir: Path, **kw: Any) -> Harness:
    ctx = make_context(spec, "s", run_id="uc", device=torch.device("cpu"))
    cls = load_entrypoint(spec.stages[0].entrypoint, "custom", CUSTOM)
    return Harness(cls(ctx), spec=spec, stage_name="s", run_id="uc", state_dir=state_dir, **kw)


def _loop(spec, state_dir: Path, **kw: Any) -> tuple[Guarded, dict[str, Any]]:
    """The loop example run as the workers run it (workers/group.py), on one rank."""
    ctx = make_context(spec, "s", run_id="uc", device=torch.device("cpu"))
    fn = load_entrypoint(spec.stages[0].entrypoint, "loop", LOOP)

    def make(stage: Any, **extra: Any) -> Harness:
        return Harness(stage, spec=spec, stage_name="s", run_id="uc", state_dir=state_dir, **kw, **extra)

    g = Guarded(ctx, make)
    return g, g.run(fn)


def _weights(h: Harness) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.stage.model.state_dict().items()}


def _trained(h: Harness) -> list[int]:
    return [int(r["batch_index"]) for r in h.exporter.history(0)]


def test_a_custom_stage_from_its_own_file_trains_and_its_corrupted_batch_spikes_the_loss(tmp_path):
    h = _custom(_spec("custom", "regression_stage:RegressionStage", steps=40,
                      faults=[{"kind": "loss_spike", "at_step": 30, "duration": 2}]), tmp_path)
    assert h.run()["state"] == "finished"
    losses = [r["loss"] for r in h.exporter.history(0)]
    assert max(losses[30:32]) > 3 * max(losses[25:30]), losses
    assert sum(losses[:5]) > 1.5 * sum(losses[25:30]), f"it learns: {losses}"
    assert h.last_eval["val_loss"] > 0 and h.output_checkpoint() is not None


@pytest.mark.parametrize("kind,entry", [("custom", "regression_stage:RegressionStage"), ("loop", "charlm:train")])
def test_rollback_with_skip_resumes_exactly_and_never_trains_the_skipped_batches(tmp_path, kind, entry):
    """Bitwise: rolled back to step 4 at step 8 with the batches since skipped, the stage ends
    where a run that resumed from the step-4 checkpoint with the same skip list ends."""
    spec = _spec(kind, entry)
    fired: list[int] = []

    def rollback_at_8(h: Harness) -> None:
        if h.step == 8 and not fired:
            fired.append(1)
            h.writer.wait()  # the step-4 checkpoint is written in the background
            ref = next(r for p, r in h.own.items() if p.endswith(f"step-{4:08d}"))
            h.inbox.put(Control(ControlKind.ROLLBACK, seq=1, payload={"checkpoint": ref.to_dict(), "skip": [[4, 8]],
                                                                       "lr_multiplier": 0.5}))

    if kind == "custom":
        rolled = _custom(spec, tmp_path / "a", on_step=rollback_at_8)
        assert rolled.run()["state"] == "finished"
    else:
        g, out = _loop(spec, tmp_path / "a", on_step=rollback_at_8)
        assert out["state"] == "finished"
        rolled = g.harness
    after = _trained(rolled)[8:]
    assert after == [8, 9, 10, 11, 12, 13, 14, 15], "the skipped batches 4-7 are never trained again"
    assert rolled.lr_multiplier == 0.5 and rolled.optimizer.param_groups[0]["lr"] == pytest.approx(
        rolled.lr_at(rolled.step - 1))
    ck4: CheckpointRef = next(r for p, r in rolled.own.items() if p.endswith(f"step-{4:08d}"))
    if kind == "custom":
        fresh = _custom(spec, tmp_path / "b", resume_from=ck4, skip=[[4, 8]], lr_multiplier=0.5)
        fresh.run()
    else:
        fresh = _loop(spec, tmp_path / "b", resume_from=ck4, skip=[[4, 8]], lr_multiplier=0.5)[0].harness
    a, b = _weights(rolled), _weights(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_loop_api_owns_the_lr_and_the_nan_fault_never_reaches_the_weights(tmp_path):
    spec = _spec("loop", "charlm:train", steps=6, faults=[{"kind": "nan", "at_step": 3}])
    seen: list[tuple[float, float]] = []
    before: dict[str, torch.Tensor] = {}

    def watch(h: Harness) -> None:
        seen.append((h.optimizer.param_groups[0]["lr"], h.lr_at(h.step - 1)))
        if h.step == 3:
            before.update(_weights(h))
        if h.step == 4:
            assert not h.last_applied, "the NaN step was not applied"
            after = _weights(h)
            assert all(torch.equal(before[k], after[k]) for k in before)

    g, out = _loop(spec, tmp_path, on_step=watch)
    assert out["state"] == "finished" and len(seen) == 6
    assert all(a == pytest.approx(b) for a, b in seen), "every step's LR is the schedule's"
    assert seen[0][0] < seen[2][0], "warmup"


def test_the_loop_api_refuses_misuse(tmp_path):
    spec = _spec("loop", "charlm:train", steps=3)
    ctx = make_context(spec, "s", run_id="uc", device=torch.device("cpu"))
    make = lambda stage, **extra: Harness(stage, spec=spec, stage_name="s", run_id="uc",  # noqa: E731
                                          state_dir=tmp_path, **extra)
    with pytest.raises(LoopError, match="register"):
        Guarded(ctx, make).run(lambda g: None)
    g = Guarded(ctx, make)
    with pytest.raises(LoopError, match="register"):
        next(iter(g.batches([1, 2, 3])))
    model = torch.nn.Linear(2, 1)

    def two_batches(g: Guarded) -> None:
        g.register(model, torch.optim.SGD(model.parameters(), lr=g.lr))
        for _ in g.batches([torch.ones(2)] * 10):
            pass

    with pytest.raises(LoopError, match="not followed by g.step"):
        Guarded(ctx, make).run(two_batches)

    def step_first(g: Guarded) -> None:
        g.register(model, torch.optim.SGD(model.parameters(), lr=g.lr))
        g.step(1.0)

    with pytest.raises(LoopError, match="without a batch"):
        Guarded(ctx, make).run(step_first)


def test_entrypoints_outside_the_allow_list_are_refused_without_an_import(tmp_path):
    probe = tmp_path / "probe_mod.py"
    probe.write_text("import os\nopen(os.path.join(os.path.dirname(__file__), 'imported'), 'w').close()\n")
    uc = UserCode(modules=("probe_mod",), paths=(str(tmp_path),))
    assert entrypoint_refusal("os:system", uc) is not None and "TRAINGUARD_USER_CODE_MODULES" in entrypoint_refusal("os:system", uc)
    assert entrypoint_refusal("probe_mod_evil:X", uc) is not None, "prefixes match whole module names"
    assert "no user code is allowed" in entrypoint_refusal("probe_mod:X", UserCode())
    with pytest.raises(UserCodeError, match="not under an allowed prefix"):
        load_entrypoint("os:system", "loop", uc)
    assert not (tmp_path / "imported").exists()


def test_check_entrypoints_names_each_problem(tmp_path):
    (tmp_path / "uc_mod.py").write_text("from trainguard.workers.stages.base import Stage\n"
                                        "class Half(Stage):\n    pass\n"
                                        "def loop(g):\n    pass\n"
                                        "def two(a, b):\n    pass\n"
                                        "VALUE = 3\n")
    (tmp_path / "uc_broken.py").write_text("raise RuntimeError('boom at import')\n")
    uc = {"modules": ["uc_mod", "uc_broken", "uc_missing"], "paths": [str(tmp_path)]}
    try:
        errors = check_entrypoints([("a", "custom", "uc_mod:Half"), ("b", "custom", "uc_mod:loop"),
                                    ("c", "loop", "uc_mod:two"), ("d", "loop", "uc_mod:nothing"),
                                    ("e", "custom", "uc_broken:X"), ("f", "loop", "uc_missing:f"),
                                    ("g", "loop", "uc_mod:loop"), ("h", "loop", "uc_mod:VALUE")], uc)
    finally:
        for m in ("uc_mod", "uc_broken"):
            sys.modules.pop(m, None)
    assert "abstract" in errors["a"] and "evaluate" in errors["a"]
    assert "not a stage class" in errors["b"]
    assert "one argument" in errors["c"]
    assert "no attribute 'nothing'" in errors["d"]
    assert "RuntimeError: boom at import" in errors["e"]
    assert "was not found" in errors["f"]
    assert "g" not in errors
    assert "not a function" in errors["h"]


def test_the_spec_takes_custom_and_loop_stages_and_refuses_bad_entrypoints():
    spec = _spec("custom", "pkg.mod:Cls", options={"width": 3, "name": "x"})
    assert spec.stages[0].options == {"width": 3, "name": "x"}
    assert spec.stages[0].model_dump()["entrypoint"] == "pkg.mod:Cls"
    for bad in ("pkg.mod", "pkg/mod:Cls", "pkg.mod:Cls:x", "../x:y", "mod:1x", ""):
        with pytest.raises(SpecError, match="stages.0.loop.entrypoint"):
            _spec("loop", bad)
    with pytest.raises(SpecError, match="only 'none'"):
        _spec("loop", "m:f", parallel={"strategy": "ddp"})
    with pytest.raises(SpecError, match="micro_batch_size"):
        _spec("custom", "m:C", micro_batch_size=2)
    with pytest.raises(SpecError, match="options"):
        _spec("custom", "m:C", options={"nested": {"a": 1}})
