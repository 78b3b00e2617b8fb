"""The storage settings of the supervisor's environment reach the rank actors (TrainWorker's
runtime_env), and only those: the Hugging Face Hub stays offline whatever the environment says."""
from __future__ import annotations

from trainguard.workers.group import TrainWorker, worker_env
from trainguard.workers.spec import HF_OFFLINE_ENV


def test_aws_and_fsspec_variables_are_forwarded_and_nothing_else():
    env = worker_env({"AWS_ENDPOINT_URL": "http://s3.internal:9000", "AWS_ACCESS_KEY_ID": "k",
                      "FSSPEC_S3_ENDPOINT_URL": "http://s3.internal:9000", "HOME": "/root",
                      "TRAINGUARD_OPERATOR_TOKEN": "secret", "HF_HUB_OFFLINE": "0"})
    assert env == {"AWS_ENDPOINT_URL": "http://s3.internal:9000", "AWS_ACCESS_KEY_ID": "k",
                   "FSSPEC_S3_ENDPOINT_URL": "http://s3.internal:9000", **HF_OFFLINE_ENV}


def test_the_actor_class_carries_the_environment_present_at_import():
    # tests/conftest.py sets the S3 test server's variables before workers/group.py is imported
    env_vars = TrainWorker._default_options["runtime_env"]["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert env_vars["HF_HUB_OFFLINE"] == "1"
