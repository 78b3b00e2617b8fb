"""The public contract between the workers and the supervisor.

`service` imports from `workers` only what is here, `workers.spec` (the pipeline
spec) and the entry points in `workers.group`. Change a name only together with
everything that reads it: dashboards/, deploy/prometheus/ rules, service/.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "MetricName",
    "WORKER_LABELS",
    "STAGE_METRIC_NAMES",
    "AnomalyKind",
    "FaultKind",
    "StageKind",
    "ControlKind",
    "Control",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "CheckpointRef",
    "CheckpointReport",
]


class MetricName:
    """Metric names (prometheus-client). Worker metrics carry `run`, `stage`, `rank`."""

    STEP = "trainguard_step"
    TRAIN_LOSS = "trainguard_train_loss"
    VAL_LOSS = "trainguard_val_loss"
    GRAD_NORM = "trainguard_grad_norm"
    LEARNING_RATE = "trainguard_learning_rate"
    TOKENS = "trainguard_tokens"  # counter: exposed as trainguard_tokens_total
    STEP_SECONDS = "trainguard_step_seconds"  # histogram
    LAST_STEP_TS = "trainguard_last_step_timestamp_seconds"
    ANOMALIES = "trainguard_anomalies"  # counter{kind}: trainguard_anomalies_total
    SPIKE_SCORE = "trainguard_spike_score"  # gauge: the guard's streaming robust score
    CHECKPOINT_STEP = "trainguard_checkpoint_step"
    CHECKPOINT_SECONDS = "trainguard_checkpoint_seconds"  # histogram (write time)
    CHECKPOINT_BYTES = "trainguard_checkpoint_bytes"
    MODEL_PARAMETERS = "trainguard_model_parameters"
    TOKENS_PER_PARAMETER = "trainguard_tokens_per_parameter"
    REWARD_MEAN = "trainguard_reward_mean"
    KL = "trainguard_kl"
    KL_COEF = "trainguard_kl_coef"
    KL_TARGET = "trainguard_kl_target"
    PREFERENCE_ACCURACY = "trainguard_preference_accuracy"
    DPO_REWARD_MARGIN = "trainguard_dpo_reward_margin"
    DPO_CHOSEN_LOGPROB = "trainguard_dpo_chosen_logprob"
    DPO_REJECTED_LOGPROB = "trainguard_dpo_rejected_logprob"
    # PPO update health (workers/stages/ppo.py): per step, rank-local, over the minibatch's response tokens
    PPO_RATIO_MEAN = "trainguard_ppo_ratio_mean"  # mean policy ratio pi/pi_old
    PPO_RATIO_MAX = "trainguard_ppo_ratio_max"
    PPO_CLIP_FRACTION = "trainguard_ppo_clip_fraction"  # tokens whose ratio is outside the clip range
    PPO_APPROX_KL = "trainguard_ppo_approx_kl"  # KL(pi_old || pi), k3 estimator
    POLICY_ENTROPY = "trainguard_policy_entropy"  # nats per response token
    VALUE_LOSS = "trainguard_value_loss"  # the critic's (clipped) value loss
    # per rollout, mean over ranks
    RESPONSE_LENGTH = "trainguard_response_length"  # mean sampled response length (tokens, EOS included)
    GPU_UTILIZATION = "trainguard_gpu_utilization_ratio"
    GPU_MEMORY_USED = "trainguard_gpu_memory_used_bytes"
    GPU_XID = "trainguard_gpu_xid_errors"  # counter: trainguard_gpu_xid_errors_total, from 0 at the worker's start
    GPU_ECC = "trainguard_gpu_ecc_errors"  # counter: trainguard_gpu_ecc_errors_total, from 0 at the worker's start
    WORKER_PAUSED = "trainguard_worker_paused"
    # counter: trainguard_process_busy_seconds_total, seconds the worker process's threads ran or
    # waited to run (Linux schedstat, summed over threads; workers/runtime/busy.py). Absent
    # where the kernel gives no schedstat
    PROCESS_BUSY = "trainguard_process_busy_seconds"
    # supervisor side
    INCIDENTS = "trainguard_incidents"  # counter{run,stage,kind}
    ROLLBACKS = "trainguard_rollbacks"  # counter{run,stage}
    RECOVERY_SECONDS = "trainguard_recovery_seconds"  # histogram{kind}
    GOODPUT = "trainguard_goodput_ratio"  # gauge{run}
    RUN_STATE = "trainguard_run_state"  # gauge{run,state} 1 for the current state


WORKER_LABELS = ("run", "stage", "rank")

STAGE_METRIC_NAMES: dict[str, str] = {
    "val_loss": MetricName.VAL_LOSS,
    "reward_mean": MetricName.REWARD_MEAN,
    "kl": MetricName.KL,
    "kl_coef": MetricName.KL_COEF,
    "kl_target": MetricName.KL_TARGET,
    "preference_accuracy": MetricName.PREFERENCE_ACCURACY,
    "dpo_reward_margin": MetricName.DPO_REWARD_MARGIN,
    "dpo_chosen_logprob": MetricName.DPO_CHOSEN_LOGPROB,
    "dpo_rejected_logprob": MetricName.DPO_REJECTED_LOGPROB,
    "ppo_ratio_mean": MetricName.PPO_RATIO_MEAN,
    "ppo_ratio_max": MetricName.PPO_RATIO_MAX,
    "ppo_clip_fraction": MetricName.PPO_CLIP_FRACTION,
    "ppo_approx_kl": MetricName.PPO_APPROX_KL,
    "policy_entropy": MetricName.POLICY_ENTROPY,
    "value_loss": MetricName.VALUE_LOSS,
    "response_length": MetricName.RESPONSE_LENGTH,
}
"""Stage metric key (a key of `StepResult.metrics` / `Stage.evaluate()`, and of the per-step
history records) -> the gauge it is exported as. The key is the gauge's name without
`trainguard_`."""


class StageKind(str, enum.Enum):
    PRETRAIN = "pretrain"
    ANNEAL = "anneal"
    SFT = "sft"
    REWARD_MODEL = "reward_model"
    PPO = "ppo"
    DPO = "dpo"
    CUSTOM = "custom"  # a user's Stage subclass (`entrypoint: module:Class`, workers/usercode.py)
    LOOP = "loop"  # a user's own loop driven through the loop API (`entrypoint: module:function`)


class FaultKind(str, enum.Enum):
    LOSS_SPIKE = "loss_spike"
    NAN = "nan"
    WORKER_CRASH = "worker_crash"
    HANG = "hang"
    SLOW = "slow"
    CHECKPOINT_CORRUPT = "checkpoint_corrupt"
    GPU_XID = "gpu_xid"


class AnomalyKind(str, enum.Enum):
    """Values of the `kind` label of trainguard_anomalies_total (the in-step guard)."""

    NONFINITE_LOSS = "nonfinite_loss"
    NONFINITE_GRAD = "nonfinite_grad"
    LOSS_SPIKE = "loss_spike"
    GRAD_SPIKE = "grad_spike"


class ControlKind(str, enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    ANNEAL = "anneal"
    LR_MULTIPLIER = "lr_multiplier"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Control:
    """A control message, acted on by every rank at the same step boundary.

    `seq` increases per worker group; a rank applies each seq once.
    Payloads:
      anneal:        {"steps": int, "final_lr": float, "schedule": "linear"|"cosine"|"exponential",
                      "mixture": {source: weight} | None}
      lr_multiplier: {"value": float}
      rollback:      {"checkpoint": CheckpointRef.to_dict() of the checkpoint to load,
                      "skip": [[start, end), ...] batch-index ranges to add to the skip list,
                      "lr_multiplier": float | None,
                      "incident": int | None: the supervisor's incident id, echoed back in
                      the group's `rollbacks_applied` once every rank has loaded it}
    """

    kind: ControlKind
    seq: int
    payload: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Control":
        return cls(kind=ControlKind(d["kind"]), seq=int(d["seq"]), payload=dict(d.get("payload") or {}))


MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint a worker may load: where it is, and the digest and size of every file
    (the manifest included) as recorded *outside* the folder when a worker reported it.

    Write access to checkpoint storage is not code execution: a worker reads a file, checks
    it against `files`, and only then deserializes it. The manifest inside the folder is
    never the trust anchor. The format of the files is the worker's business; this contract
    only names files and their hashes, so sharded formats keep it."""

    path: str
    # file name -> {"blake3": hex, "bytes": int}; checkpoints written before BLAKE3 recorded
    # {"sha256": hex, "bytes": int}, which still verifies (workers/runtime/checkpoint.digest_mismatch)
    files: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "files": {k: dict(v) for k, v in self.files.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointRef":
        files = d.get("files")
        if not isinstance(d.get("path"), str) or not isinstance(files, dict) or not files:
            raise ValueError("a checkpoint reference needs a path and the recorded hashes of its files")
        return cls(path=d["path"], files={str(k): dict(v) for k, v in files.items()})


@dataclass(frozen=True)
class CheckpointReport:
    """What rank 0 reports, through Ray, for every checkpoint it wrote; the supervisor
    registers exactly these (with `ref.files` as the recorded hashes) and nothing it finds
    in storage on its own. `seq` increases per worker, so a poll asks only for new ones."""

    seq: int
    ref: CheckpointRef
    step: int
    batch_cursor: int
    healthy: bool
    metrics: dict[str, float | None] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "ref": self.ref.to_dict(), "step": self.step, "batch_cursor": self.batch_cursor,
                "healthy": self.healthy, "metrics": dict(self.metrics), "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointReport":
        return cls(seq=int(d["seq"]), ref=CheckpointRef.from_dict(d["ref"]), step=int(d["step"]),
                   batch_cursor=int(d["batch_cursor"]), healthy=bool(d["healthy"]),
                   metrics=dict(d.get("metrics") or {}), tags=tuple(d.get("tags") or ()))
