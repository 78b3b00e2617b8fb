"""What the API needs from the controller (service/controller.py implements it).

Contract: methods raise service.errors.NotFound / Conflict / InvalidRequest for
requests that will never succeed, Unavailable for ones a retry may fix. `submit`
has persisted the run (crud.create_run) before it returns the id. Every control
method writes the action and its outcome to the run's event log with `actor`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from trainguard.workers.spec import PipelineSpec

if TYPE_CHECKING:
    from trainguard.service.api.schemas import AlertmanagerPayload

__all__ = ["ControllerPort"]


@runtime_checkable
class ControllerPort(Protocol):
    def submit(self, spec: PipelineSpec, *, actor: str, recovery_mode: str | None = None) -> str:
        """`recovery_mode`: auto, approve or observe; None: the deployment's default. (The API
        passes it only when the request names one.)"""
        ...

    def pause(self, run_id: str, *, actor: str) -> None: ...

    def resume(self, run_id: str, *, actor: str) -> None: ...

    def stop(self, run_id: str, *, actor: str) -> None: ...

    def anneal(
        self,
        run_id: str,
        *,
        steps: int,
        final_lr: float,
        schedule: str,
        mixture: dict[str, float] | None,
        actor: str,
    ) -> None: ...

    def rollback(
        self,
        run_id: str,
        *,
        checkpoint_id: int | None,
        actor: str,
        skip: bool = True,
        lr_multiplier: float | None = None,
    ) -> dict[str, Any]:
        """Roll back to `checkpoint_id` (None: the newest good checkpoint). `skip`: add the batches
        since the checkpoint to the skip list; `lr_multiplier`: None means the policy's lr_backoff.
        Returns {"incident", "action", "rollback_to_step"}."""
        ...

    def approve_proposal(self, run_id: str, proposal_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Carry out a waiting recovery proposal exactly as recorded. NotFound: no such proposal
        in the run; Conflict: decided already, made in observe mode, or no longer applicable
        (then marked expired; nothing changed). Returns {"proposal", "state", "incident",
        "action", "rollback_to_step", "run_state"}."""
        ...

    def reject_proposal(self, run_id: str, proposal_id: int, *, actor: str, note: str | None = None) -> dict[str, Any]:
        """Decline a waiting proposal; nothing else changes. Same errors and answer as approve."""
        ...

    def handle_alerts(self, payload: "AlertmanagerPayload", *, actor: str) -> dict[str, int]:
        """Returns counts {"created", "merged", "resolved", "ignored"}; idempotent per fingerprint."""
        ...

    def sd_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP SD: [{"targets": ["host:port"], "labels": {"run", "stage", "rank"}}]."""
        ...

    def metrics_text(self) -> bytes: ...

    def ready(self) -> bool: ...
