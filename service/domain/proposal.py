"""Recovery modes and proposals: what the supervisor does with a policy decision per run.

| mode | ROLLBACK / RESTART | NEEDS_ATTENTION | NOTIFY |
|---|---|---|---|
| auto | carried out | carried out (pause, needs_attention) | recorded |
| approve | proposed; the run is held (workers paused, run `needs_attention`) until an operator approves (carried out exactly as proposed) or rejects (nothing changes) | carried out: it already waits for an operator | recorded |
| observe | proposed, never carried out; training goes on untouched | proposed, never carried out | recorded |

An operator's own rollback is carried out in every mode (it is the operator's decision).
Pure: standard library and the policy's types only.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from trainguard.service.domain.policy import Action, Decision

__all__ = [
    "RecoveryMode",
    "ProposalState",
    "RECOVERY_MODES",
    "PROPOSAL_STATES",
    "proposes",
    "holds_training",
    "decision_from_proposal",
    "proposal_fields",
]


class RecoveryMode(str, enum.Enum):
    AUTO = "auto"  # act on every decision (the default)
    APPROVE = "approve"  # propose, hold the run, act when an operator approves
    OBSERVE = "observe"  # propose, never act

    def __str__(self) -> str:
        return self.value


class ProposalState(str, enum.Enum):
    PROPOSED = "proposed"  # waiting for an operator (approve mode) or only on record (observe mode)
    APPROVED = "approved"  # carried out exactly as proposed
    REJECTED = "rejected"  # an operator said no; nothing was changed
    EXPIRED = "expired"  # can no longer be carried out (run ended, stage over, checkpoint gone)
    SUPERSEDED = "superseded"  # another recovery of the stage happened first

    def __str__(self) -> str:
        return self.value


RECOVERY_MODES = tuple(m.value for m in RecoveryMode)
PROPOSAL_STATES = tuple(s.value for s in ProposalState)

_ACTING = frozenset({Action.ROLLBACK, Action.RESTART})


def proposes(mode: RecoveryMode | str, action: Action) -> bool:
    """True when a decision with `action` becomes a proposal instead of being carried out."""
    m = RecoveryMode(mode)
    if m is RecoveryMode.AUTO:
        return False
    if m is RecoveryMode.APPROVE:
        return action in _ACTING
    return action in _ACTING or action is Action.NEEDS_ATTENTION


def holds_training(mode: RecoveryMode | str, action: Action) -> bool:
    """True when the run is held for the operator while the proposal waits: approve mode
    pauses the workers (a spike trained on would waste compute and retention could delete the
    proposed checkpoint meanwhile); observe mode never touches the run."""
    return RecoveryMode(mode) is RecoveryMode.APPROVE and action in _ACTING


def decision_from_proposal(*, action: str, reason: str, checkpoint_step: int | None, checkpoint_ref: str | None,
                           skip: Sequence[Sequence[int]], lr_multiplier: float, lr_target: float | None,
                           attempt: int, source: str | None) -> Decision:
    """The stored proposal back as the Decision it recorded, field for field."""
    return Decision(Action(action), reason, checkpoint_step=checkpoint_step, checkpoint_ref=checkpoint_ref,
                    skip=[(int(a), int(b)) for a, b in skip], lr_multiplier=float(lr_multiplier),
                    lr_target=None if lr_target is None else float(lr_target), attempt=int(attempt), source=source)


def proposal_fields(decision: Decision) -> Mapping[str, Any]:
    """The Decision as the proposal stores it (the inverse of `decision_from_proposal`)."""
    return {"action": decision.action.value, "reason": decision.reason, "checkpoint_step": decision.checkpoint_step,
            "checkpoint_ref": decision.checkpoint_ref, "skip": [[int(a), int(b)] for a, b in decision.skip],
            "lr_multiplier": decision.lr_multiplier, "lr_target": decision.lr_target, "attempt": decision.attempt,
            "source": decision.source}
