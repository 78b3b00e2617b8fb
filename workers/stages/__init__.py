"""Training stages, one module each; `STAGES` maps a stage kind to its class."""
from __future__ import annotations

from workers.stages.anneal import AnnealStage
from workers.stages.base import Stage, StageContext, StepResult
from workers.stages.dpo import DPOStage
from workers.stages.ppo import PPOStage
from workers.stages.pretrain import PretrainStage
from workers.stages.reward_model import RewardModelStage
from workers.stages.sft import SFTStage

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
