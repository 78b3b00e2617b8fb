"""A Hugging Face model under the supervisor: a tiny Llama saved locally under an allowed data
root runs pretrain -> SFT on one rank in Ray workers (offline), then `trainguard export` writes
the SFT output as a folder `from_pretrained` loads and generates from. A model folder outside
the data roots is refused at submit."""
from __future__ import annotations


import pytest
import ray

from tests.integration.supervisor.harness import running_controller, wait_state
from trainguard.service.access import check_pipeline_access
from trainguard.service.config import Settings
from trainguard.service.db import crud
from trainguard.service.errors import InvalidRequest
from trainguard.workers.spec import parse_pipeline

from tests.support import export_and_generate, save_tiny_llama

pytestmark = pytest.mark.integration

CORPUS = [f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n    return x + {i}\n" for i in range(200)]


def _pipeline(model_path: str):
    stage = {"world_size": 1, "batch_size": 4, "lr": 3e-3, "eval_every": 4, "eval_batches": 1}
    return parse_pipeline({
        "name": "hf-tiny", "seed": 5,
        "model": {"seq_len": 32, "hf": {"path": model_path}},
        "checkpoint": {"every": 3, "keep_last": 3},
        "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 6, **stage},
                   {"name": "sft", "kind": "sft", "steps": 4, **stage}],
    })


def test_hf_llama_pretrain_sft_under_the_supervisor_then_export(ray_session, tmp_state, tmp_path, capsys):
    model_dir = tmp_state / "data" / "models" / "tiny-llama"  # <state>/data: the default allowed data root
    save_tiny_llama(model_dir, CORPUS)
    outside = tmp_path / "elsewhere" / "tiny-llama"
    settings = Settings(state_dir=tmp_state, environment="development")
    with pytest.raises(InvalidRequest, match=r"^model\.hf\.path: .* is not under an allowed data root"):
        check_pipeline_access(_pipeline(str(outside)), settings)
    spec = _pipeline(str(model_dir))
    check_pipeline_access(spec, settings)

    with running_controller(tmp_state) as ctl:
        run_id = ctl.submit(spec, actor="test")
        assert wait_state(ctl, run_id, timeout=240) == "completed"
        with ctl.session() as s:
            stages = {st.name: st for st in crud.list_stages(s, run_id=run_id)}
        assert stages["sft"].output_checkpoint

    # the workers ran offline: every TrainWorker gets the variables from its runtime_env
    from trainguard.workers.group import TrainWorker

    probe = TrainWorker.remote()
    try:
        env = ray.get(probe.__ray_call__.remote(lambda _self: {k: __import__("os").environ.get(k)
                                                                for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}))
    finally:
        ray.kill(probe)
    assert env == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    export_and_generate(run_id, "sft", tmp_path / "export", tmp_state, capsys)
