"""Scraping a worker's /metrics and /history the way the supervisor does."""
from __future__ import annotations

import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(host: str, port: int) -> list:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(samples: list, name: str, **labels) -> float | None:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == str(v) for k, v in labels.items()):
            return s.value
    return None


def history(host: str, port: int, since: int = 0) -> list[dict]:
    with urllib.request.urlopen(f"http://{host}:{port}/history?since={since}", timeout=5) as r:
        return json.loads(r.read())


def tiny_pipeline(steps: int = 40, world_size: int = 1, **stage) -> dict:
    st = {"name": "pretrain", "kind": "pretrain", "steps": steps, "world_size": world_size, "batch_size": 8,
          "lr": 0.01, "eval_every": 20, "eval_batches": 1}
    st.update(stage)
    return {"name": "it", "seed": 1, "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
            "checkpoint": {"every": 10, "keep_last": 10}, "stages": [st]}
