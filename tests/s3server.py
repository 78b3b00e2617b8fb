"""A real S3-compatible server for the object-store checkpoint tests: moto's standalone server
(`python -m moto.server`), one process per test session (the `s3_server` fixture in
tests/conftest.py).

Its address and (fake) credentials are put into this process's environment when tests/conftest.py
is imported, before any test starts Ray or imports workers/group.py: Ray workers inherit the
environment of the process that started Ray, and TrainWorker's runtime_env takes the AWS_*
variables present when workers/group.py is imported (workers.group.worker_env). A variable set
later would not reach the warm-pool actors that already exist. The server itself starts only
when a test asks for it."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass

__all__ = ["S3Server", "S3_ENV", "BUCKET", "configure_environment", "start_server"]

BUCKET = "tg-test"
S3_ENV: dict[str, str] = {}


def _pick_port() -> int:
    # Above Ray's worker-port range (10002-19999) and below the kernel's ephemeral range, which
    # `free_port()` callers draw from: nothing else in the session takes it before the server does.
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the S3 test server in 20000-30000")


def configure_environment() -> dict[str, str]:
    """Point this process (and so Ray and its workers) at the session's S3 server; idempotent."""
    if not S3_ENV:
        port = int(os.environ.get("TRAINGUARD_TEST_S3_PORT") or _pick_port())
        S3_ENV.update({
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(k, None)  # a developer's own AWS set-up must not leak into the tests
        os.environ.update(S3_ENV)
    return dict(S3_ENV)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]

    def prefix(self, name: str = "ckpt") -> str:
        """A fresh `s3://bucket/...` prefix for one test."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def start_server(timeout: float = 30.0) -> S3Server:
    """Start moto's server on the configured port and create the bucket; RuntimeError (with the
    server's output) when it does not answer in time."""
    env = configure_environment()
    endpoint = env["AWS_ENDPOINT_URL"]
    port = endpoint.rsplit(":", 1)[1]
    log = tempfile.TemporaryFile()  # the server's output, read back only if it fails to start
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")
            raise RuntimeError(f"moto server exited with {proc.returncode} on port {port}: {out[-2000:]}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not answer on {endpoint} in {timeout:g} s") from None
            time.sleep(0.05)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return S3Server(endpoint, BUCKET, proc)
