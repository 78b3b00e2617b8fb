"""service.access: a pipeline's Hugging Face model folder must lie under an allowed data root."""
from __future__ import annotations

import pytest

from trainguard.service.access import check_pipeline_access
from trainguard.service.config import Settings
from trainguard.service.errors import InvalidRequest
from trainguard.workers.spec import parse_pipeline


def _spec(hf: dict):
    return parse_pipeline({"name": "t", "model": {"seq_len": 32, "hf": hf},
                           "stages": [{"name": "pretrain", "kind": "pretrain", "steps": 2}]})


@pytest.fixture
def settings(tmp_path):
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "outside")
    return Settings(state_dir=tmp_path / "state", allowed_data_roots=[str(tmp_path / "data")])


def test_model_folder_under_a_data_root_is_accepted(settings, tmp_path):
    check_pipeline_access(_spec({"path": str(tmp_path / "data" / "models" / "tiny")}), settings)
    check_pipeline_access(_spec({"config": {"architecture": "llama", "hidden_size": 32}}), settings)  # no folder


@pytest.mark.parametrize("where", ["outside/tiny", "data/escape/tiny", "data/../outside/tiny"])
def test_model_folder_outside_the_roots_is_refused_naming_the_field(settings, tmp_path, where):
    path = f"{tmp_path}/{where}"
    msg = str(pytest.raises(InvalidRequest, check_pipeline_access, _spec({"path": path}), settings).value)
    assert msg.startswith("model.hf.path: ") and "allowed data root" in msg
    assert str(tmp_path / "data") not in msg.replace(path, "")  # never names an allowed root
