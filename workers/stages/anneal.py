"""Annealing: the pretraining objective on a cleaner mixture while the LR decays.

The runtime applies the decay (spec `final_lr`, `schedule`); the spec's default
mixture is mostly curated. Only the kind differs from pretraining.
"""
from __future__ import annotations

from trainguard.workers.stages.pretrain import PretrainStage

__all__ = ["AnnealStage"]


class AnnealStage(PretrainStage):
    kind = "anneal"
