"""Incident detectors: pure functions from step-aligned windows to a `Finding`.

Every detector takes plain data (samples sorted by step; see `series.py`), a
frozen config with documented defaults, and returns the first episode it finds
as a `Finding`, or None. Nothing here reads a clock, a socket or a database.

Modules: `base` (IncidentKind, Finding, the shared robust statistics), `loss` (loss
spike, gradient explosion, divergence, NaN), `instability` (loss oscillating well above its
running best while the LR is high), `post_training` (validation divergence,
reward hacking, DPO collapse, and PPO's update health: policy ratio, negative KL estimate,
entropy collapse, response-length collapse/explosion, value-loss explosion), `health` (hang, straggler, worker lost, GPU fault).

Shared conventions:
- Windows count *samples*, not steps: a sparse window from Prometheus scrapes
  works like a dense one from the workers' /history, only with coarser onsets.
- `after=S` reports only episodes that start after step S. The supervisor passes
  the end of the last incident; `service.analyze` passes the end of the episode it
  just reported (`evidence["end_step"]`) to keep scanning a whole log.
- `onset_step` is the first step that looked wrong; `detected_at_step` is the
  step at which the evidence became conclusive (e.g. the `persistence`-th
  consecutive bad sample).
- `evidence` is JSON-serialisable: the triggering (step, value) pairs under
  "window" (non-finite values as the strings "nan", "inf", "-inf"), the score and
  the threshold it crossed, and "end_step" (last step of the episode, None while
  it is still going on).
"""
from trainguard.service.domain.detectors.base import Finding, IncidentKind, MedianTrack
from trainguard.service.domain.detectors.health import (
    GpuFaultConfig,
    HangConfig,
    StragglerConfig,
    detect_gpu_fault,
    detect_hang,
    detect_straggler,
    detect_worker_lost,
    hang_threshold,
    step_gaps,
)
from trainguard.service.domain.detectors.instability import InstabilityConfig, detect_instability, instability_ruled_out
from trainguard.service.domain.detectors.loss import (
    DivergenceConfig,
    ExcursionTrack,
    GradExplosionConfig,
    LossSpikeConfig,
    NanConfig,
    detect_divergence,
    detect_grad_explosion,
    detect_loss_spike,
    detect_nan,
    divergence_ruled_out,
)
from trainguard.service.domain.detectors.post_training import (
    DpoCollapseConfig,
    EntropyCollapseConfig,
    NegativeKlConfig,
    PolicyRatioConfig,
    ResponseLengthConfig,
    RewardHackingConfig,
    ValDivergenceConfig,
    ValueLossConfig,
    detect_dpo_collapse,
    detect_entropy_collapse,
    detect_negative_kl,
    detect_policy_ratio,
    detect_response_length,
    detect_reward_hacking,
    detect_val_divergence,
    detect_value_loss_explosion,
)

__all__ = [
    "IncidentKind",
    "Finding",
    "LossSpikeConfig",
    "GradExplosionConfig",
    "DivergenceConfig",
    "InstabilityConfig",
    "NanConfig",
    "ValDivergenceConfig",
    "RewardHackingConfig",
    "DpoCollapseConfig",
    "PolicyRatioConfig",
    "NegativeKlConfig",
    "EntropyCollapseConfig",
    "ResponseLengthConfig",
    "ValueLossConfig",
    "HangConfig",
    "StragglerConfig",
    "GpuFaultConfig",
    "detect_loss_spike",
    "detect_grad_explosion",
    "detect_divergence",
    "detect_instability",
    "detect_nan",
    "detect_val_divergence",
    "detect_reward_hacking",
    "detect_dpo_collapse",
    "detect_policy_ratio",
    "detect_negative_kl",
    "detect_entropy_collapse",
    "detect_response_length",
    "detect_value_loss_explosion",
    "detect_hang",
    "hang_threshold",
    "step_gaps",
    "detect_straggler",
    "detect_worker_lost",
    "detect_gpu_fault",
    # incremental watch (service/domain/evaluate.py): trackers kept over the buffered series, and
    # the exact "cannot find anything" tests that spare a cycle the scans
    "MedianTrack",
    "ExcursionTrack",
    "divergence_ruled_out",
    "instability_ruled_out",
]
