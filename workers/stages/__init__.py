"""Training stages, one module each; `STAGES` maps a stage kind to its class."""
from __future__ import annotations

from trainguard.workers.stages.anneal import AnnealStage
from trainguard.workers.stages.base import Stage, StageContext, StepResult
from trainguard.workers.stages.dpo import DPOStage
from trainguard.workers.stages.ppo import PPOStage
from trainguard.workers.stages.pretrain import PretrainStage
from trainguard.workers.stages.reward_model import RewardModelStage
from trainguard.workers.stages.sft import SFTStage

__all__ = [
    "STAGES",
    "Stage",
    "StageContext",
    "StepResult",
    "PretrainStage",
    "AnnealStage",
    "SFTStage",
    "RewardModelStage",
    "PPOStage",
    "DPOStage",
]

STAGES: dict[str, type[Stage]] = {
    cls.kind: cls for cls in (PretrainStage, AnnealStage, SFTStage, RewardModelStage, PPOStage, DPOStage)
}
