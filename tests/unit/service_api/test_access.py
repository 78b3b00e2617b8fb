"""service.access: a pipeline reads data and writes checkpoints only where the deployment allows,
and the answer is the same whether a path exists or not."""
from __future__ import annotations

import os

import pytest

from trainguard.service.access import check_pipeline_access
from trainguard.service.config import Settings
from trainguard.service.errors import InvalidRequest
from trainguard.workers.spec import parse_pipeline

BUCKET = "s3://tg-bucket/checkpoints"


@pytest.fixture
def roots(tmp_path):
    data, ckpt, outside = tmp_path / "data", tmp_path / "ckpt", tmp_path / "outside"
    for d in (data, ckpt, outside):
        d.mkdir()
    (data / "corpus.txt").write_text("hello\n")
    (outside / "secret.txt").write_text("nope\n")
    (data / "escape.txt").symlink_to(outside / "secret.txt")
    (data / "escape-dir").symlink_to(outside)
    (ckpt / "escape").symlink_to(outside)
    settings = Settings(state_dir=tmp_path / "state", allowed_data_roots=[str(data)],
                        allowed_storage=[str(ckpt), BUCKET])
    return settings, data, ckpt, outside


def _spec(data=None, storage=None, stage_storage=None):
    stages = [{"name": "pretrain", "kind": "pretrain", "steps": 10},
              {"name": "sft", "kind": "sft", "steps": 5}]
    if stage_storage is not None:
        stages[1]["checkpoint"] = {"storage": stage_storage}
    doc = {"name": "t", "stages": stages, "data": data or {}}
    if storage is not None:
        doc["checkpoint"] = {"storage": storage}
    return parse_pipeline(doc)


def _refused(settings, spec) -> str:
    with pytest.raises(InvalidRequest) as e:
        check_pipeline_access(spec, settings)
    return str(e.value)


def test_data_and_storage_inside_the_roots_are_accepted(roots):
    settings, data, ckpt, _ = roots
    spec = _spec(data={"corpus": str(data / "corpus.txt"), "later": str(data / "not-yet" / "x.jsonl")},
                 storage=str(ckpt / "fast"), stage_storage=f"{BUCKET}/sft")
    check_pipeline_access(spec, settings)
    check_pipeline_access(_spec(storage=f"file://{ckpt}/x", stage_storage=BUCKET), settings)
    check_pipeline_access(_spec(), settings)  # defaults: the supervisor's own checkpoint folder


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "{data}/../outside/secret.txt",  # traversal
        "{data}/escape.txt",  # a symlink inside the root that leads outside
        "{data}/escape-dir/secret.txt",
        "{data}-evil/corpus.txt",  # a sibling sharing the root's prefix
        "relative/corpus.txt",
        "file:///etc/passwd",
        "s3://tg-bucket/checkpoints/corpus.txt",
        "http://169.254.169.254/latest/meta-data",
        "/data\x00/x",
    ],
)
def test_data_outside_the_allowed_roots_is_refused_naming_the_field(roots, path):
    settings, data, _, _ = roots
    message = _refused(settings, _spec(data={"corpus": path.format(data=data)}))
    assert message.startswith("data.corpus: ") and "allowed data root" in message


def test_the_answer_does_not_tell_whether_a_path_exists(roots):
    settings, _, _, outside = roots
    there = _refused(settings, _spec(data={"corpus": str(outside / "secret.txt")}))
    missing = _refused(settings, _spec(data={"corpus": str(outside / "absent.txt")}))
    assert there.replace("secret", "X") == missing.replace("absent", "X")
    link = _refused(settings, _spec(data={"corpus": str(roots[1] / "escape.txt")}))
    assert str(outside) not in link  # the resolved target is never shown


@pytest.mark.parametrize(
    "storage",
    [
        "/tmp/anywhere",
        "{ckpt}/../outside",
        "{ckpt}/escape/run",  # symlink out of the root
        "{ckpt}-2",
        "ckpt-relative",
        "http://example.com/ckpt",
        "https://example.com/ckpt",
        "ftp://example.com/ckpt",
        "github://org:repo@main/ckpt",
        "sftp://host/ckpt",
        "ssh://host/ckpt",
        "hdfs://namenode/ckpt",
        "memory://ckpt",
        "file://host/ckpt",
        "simplecache::s3://tg-bucket/checkpoints/x",
        "s3://tg-bucket/checkpoints::http://x",
        "s3://other-bucket/checkpoints",
        "s3://tg-bucket/checkpoints-2",
        "s3://tg-bucket/checkpoints/../private",
        "s3://tg-bucket/checkpoints/./x",
        "s3://key:secret@tg-bucket/checkpoints",
        "s3://tg-bucket/checkpoints/x?endpoint_url=http://evil",
        "gs://tg-bucket/checkpoints",  # the allowed prefix names s3
    ],
)
def test_storage_outside_the_allowed_roots_is_refused_naming_the_field(roots, storage):
    settings, _, ckpt, _ = roots
    value = storage.format(ckpt=ckpt)
    message = _refused(settings, _spec(storage=value))
    assert message.startswith("checkpoint.storage: ") and "allowed checkpoint storage" in message
    message = _refused(settings, _spec(stage_storage=value))
    assert message.startswith("stages.1.checkpoint.storage: ")


def test_a_long_value_is_shown_shortened(roots):
    settings = roots[0]
    message = _refused(settings, _spec(data={"corpus": "/x" * 10_000}))
    assert len(message) < 500


def test_the_default_roots_are_under_the_state_dir(tmp_path):
    settings = Settings(state_dir=tmp_path)
    check_pipeline_access(_spec(data={"c": str(tmp_path / "data" / "c.txt")},
                                storage=str(tmp_path / "checkpoints" / "mine")), settings)
    _refused(settings, _spec(data={"c": str(tmp_path / "trainguard.db")}))
    _refused(settings, _spec(storage=str(tmp_path)))
    assert os.path.isabs(settings.allowed_storage[0])
