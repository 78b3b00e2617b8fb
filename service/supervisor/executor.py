"""The recovery executor: a finding becomes an incident (once), the policy decides, and the
decision is carried out on the stage's worker group.

    Finding --record--> incident --decide (policy, over the catalog's checkpoints)--> Decision
            --carry out--> ROLLBACK control to the live group | RESTART of the group by its driver
                           | NEEDS_ATTENTION (pause) | NOTIFY (recorded)

A recovery in flight is the stage's `PendingRecovery`; the ingest completes it when rank 0's
steps show it took effect (`recovered`). Everything here runs under the run's lock.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from trainguard.service.domain.detectors import Finding, detect_worker_lost
from trainguard.service.domain.evaluate import WatchConfig
from trainguard.service.domain.policy import (
    Action, Decision, RunSnapshot, budget_source, decide, dedup_key, in_effect, operator_rollback,
)
from trainguard.service.domain.proposal import (
    ProposalState, RecoveryMode, decision_from_proposal, holds_training, proposal_fields, proposes,
)
from trainguard.service.domain.state import TERMINAL_RUN_STATES, RunState
from trainguard.service.db.models import Proposal
from trainguard.service.supervisor.catalog import CheckpointCatalog
from trainguard.service.supervisor.ledger import Ledger, row_id
from trainguard.service.supervisor.stage import ActiveStage, PendingRecovery
from trainguard.service.telemetry import SupervisorMetrics
from trainguard.workers.contract import ControlKind

__all__ = ["RecoveryExecutor", "Handled", "OPERATOR_ROLLBACK", "SPIKE_FAMILY", "ProposalListener"]

log = logging.getLogger(__name__)

OPERATOR_ROLLBACK = "operator_rollback"
SPIKE_FAMILY = frozenset({"loss_spike", "divergence", "nan", "grad_explosion", "reward_hacking", "dpo_collapse",
                          "instability", "policy_ratio", "entropy_collapse", "response_length", "value_loss_explosion"})
"""Kinds that are one problem seen by several detectors: while a recovery from one is in
flight, another is the same problem (merged), not a new incident."""
_MAX_CHECKPOINT_RETRIES = 10


ProposalListener = Callable[[Proposal, str], None]
"""Told of every proposal event (the proposal row, then "proposed", "approved", "rejected",
"expired" or "superseded"): the controller annotates Grafana with it."""


class GroupRestarter(Protocol):
    def request_restart(self, run_id: str, *, checkpoint: str | None, incident: int) -> bool:
        """Ask the run's driver for a new worker group from `checkpoint`; False: no driver."""
        ...


@dataclass(frozen=True)
class Handled:
    incident: int | None
    created: bool
    action: Action | None = None
    ignored: str | None = None
    proposal: int | None = None
    """Approve / observe mode: the proposal recorded instead of carrying `action` out."""


class RecoveryExecutor:
    def __init__(self, ledger: Ledger, catalog: CheckpointCatalog, metrics: SupervisorMetrics,
                 config: WatchConfig, restarter: GroupRestarter, *, approval_timeout: float | None = None,
                 on_proposal: ProposalListener | None = None) -> None:
        self.ledger, self.catalog, self.metrics, self.config = ledger, catalog, metrics, config
        self.restarter = restarter
        self.approval_timeout = approval_timeout
        """Approve mode: seconds after which a waiting proposal is carried out as if approved (None: never)."""
        self.on_proposal = on_proposal

    # ---- record --------------------------------------------------------------------------------
    def handle(self, run_id: str, active: ActiveStage, finding: Finding, *, source: str,
               fingerprint: str | None = None, actor: str = "supervisor") -> Handled:
        """Record the incident (de-duplicated) and carry out the policy's decision once (or, as
        the run's recovery mode says, record it as a proposal; an operator's request is always
        carried out)."""
        kind = finding.kind
        with self.ledger.lock(run_id):
            run = self.ledger.run(run_id)
            if RunState(run.state) in TERMINAL_RUN_STATES:
                return Handled(None, False, ignored="run has ended")
            mode = RecoveryMode.AUTO if source == "operator" else RecoveryMode(run.recovery_mode)
            pend = active.pending
            if pend is not None and (kind in SPIKE_FAMILY or kind == pend.kind):
                # a recovery is already in flight for this stage: the same problem seen again
                return self._merge(pend.incident, fingerprint)
            active.handled_until[kind] = finding.detected_at_step
            open_same = [i for i in self.ledger.stage_incidents(run_id, active.name, open_only=True)
                         if i.kind == kind or (kind in SPIKE_FAMILY and i.kind in SPIKE_FAMILY
                                               and (i.evidence or {}).get("proposal") is not None)]
            # (a spike-family problem while a proposal about another waits: the same problem)
            if open_same:
                return self._merge(row_id(open_same[0]), fingerprint)
            generation = len(self.ledger.attempts(run_id, active.name))
            key = dedup_key(run_id, active.name, kind, finding.onset_step, generation=generation)
            if source == "operator":
                key += f"/op{time.time_ns()}"  # every operator request is its own incident
            inc, created = self.ledger.create_incident(
                run_id=run_id, stage_name=active.name, kind=kind, onset_step=finding.onset_step,
                detected_at_step=finding.detected_at_step, source=source, evidence=finding.evidence,
                dedup_key=key, alert_fingerprints=[fingerprint] if fingerprint else [])
            incident_id = row_id(inc)
            if not created:
                return self._merge(incident_id, fingerprint)
            self.metrics.incidents.labels(run=run_id, stage=active.name, kind=kind).inc()
            log.warning("incident %s: %s in %s/%s at step %s (%s)", incident_id, kind, run_id, active.name,
                        finding.onset_step, source)
            decision = self._decide_on_valid_checkpoint(run_id, active, incident_id, finding)
            if proposes(mode, decision.action):
                pid = self._propose(run_id, active, incident_id, finding, decision, mode, actor=actor)
                return Handled(incident_id, True, decision.action, proposal=pid)
            self._carry_out(run_id, active, incident_id, kind, decision, actor=actor)
            return Handled(incident_id, True, decision.action)

    def _merge(self, incident_id: int, fingerprint: str | None) -> Handled:
        self.ledger.add_fingerprint(incident_id, fingerprint)
        return Handled(incident_id, False)

    def worker_lost(self, run_id: str, active: ActiveStage, status: dict[str, Any]) -> None:
        """The group's poll found a dead or failed rank (detect_worker_lost over the poll)."""
        with self.ledger.lock(run_id):
            if active.pending is not None and active.pending.restart:
                return  # already restarting
            # a dead rank's step is unknown: the stage's last step stands in for it
            here = max(active.last_step, 0)
            ranks = [{**r, "step": here if r.get("step") is None else r["step"]} for r in status.get("ranks") or []]
            finding = detect_worker_lost({**status, "ranks": ranks})
            if finding is None:
                step = max(active.last_step, 0)
                finding = Finding("worker_lost", step, step, {"group_error": status.get("error")})
            self.handle(run_id, active, finding, source="watch")

    # ---- decide --------------------------------------------------------------------------------
    def _decide_on_valid_checkpoint(self, run_id: str, active: ActiveStage, incident_id: int,
                                    finding: Finding) -> Decision:
        """The policy's decision, taken again while its checkpoint fails verification right
        before use (a corrupt one is quarantined and the next older one considered)."""
        self.catalog.pull(run_id, active.name, active.group)  # the driver's poll may lag behind
        self.catalog.scan([run_id])
        decision = self.decide(run_id, active, incident_id, finding)
        for _ in range(_MAX_CHECKPOINT_RETRIES):
            if (decision.checkpoint_ref is None or decision.action not in (Action.ROLLBACK, Action.RESTART)
                    or self.catalog.verified_now(run_id, decision.checkpoint_ref, active.name)):
                break
            decision = self.decide(run_id, active, incident_id, finding)
        return decision

    def decide(self, run_id: str, active: ActiveStage, incident_id: int, finding: Finding) -> Decision:
        """The policy over the stage's checkpoints and earlier recoveries; an operator rollback
        goes to the named checkpoint (or the newest good one)."""
        checkpoints = self.ledger.checkpoint_infos(run_id, active.name)
        batch_at = {int(r["step"]): int(r["batch_index"]) for r in active.records.get(0, []) if "batch_index" in r}
        if finding.kind == OPERATOR_ROLLBACK:
            ev = finding.evidence
            factor = ev.get("lr_multiplier")
            return operator_rollback(
                checkpoints, requested_step=ev.get("requested_checkpoint_step"), skip=bool(ev.get("skip", True)),
                factor=None if factor is None else float(factor), last_step=active.last_step,
                next_batch=batch_at.get(active.last_step, active.batch_cursor) + 1, cfg=self.config.recovery)
        pend = active.pending
        if pend is not None and pend.target_step is not None:
            # a recovery decided and not yet in effect (a rollback that has not landed, a group
            # not yet up) says the checkpoints after its target are not to be trained on: one
            # decided meanwhile (a rank lost before the rollback landed) must not restart from them
            checkpoints = [c for c in checkpoints if c.step <= pend.target_step]
        attempts = self.ledger.attempts(run_id, active.name, exclude=incident_id)
        used: dict[str, int] = {}
        for a in attempts:
            if (src := budget_source(a.kind)) is not None:
                used[src] = used.get(src, 0) + 1
        skip, _ = in_effect(attempts)
        snapshot = RunSnapshot(checkpoints=checkpoints, attempts=attempts, budgets_used=used, skip=skip,
                               batch_index_at=batch_at)
        return decide(finding, snapshot, self.config.recovery)

    # ---- propose (approve / observe modes) ------------------------------------------------------
    def _propose(self, run_id: str, active: ActiveStage, incident_id: int, finding: Finding, decision: Decision,
                 mode: RecoveryMode, *, actor: str) -> int:
        """Record the decision as a proposal instead of carrying it out; approve mode holds the
        run for the operator (workers paused, run needs_attention); observe mode touches nothing."""
        ckpt = (self.ledger.find_checkpoint(run_id, decision.checkpoint_ref, active.name)
                if decision.checkpoint_ref else None)
        hold = holds_training(mode, decision.action)
        auto_at = (self.ledger.now() + timedelta(seconds=self.approval_timeout)
                   if mode is RecoveryMode.APPROVE and self.approval_timeout is not None else None)
        prop = self.ledger.create_proposal(
            run_id, stage_name=active.name, incident_id=incident_id, mode=mode.value, kind=finding.kind,
            **proposal_fields(decision), checkpoint_id=ckpt.id if ckpt is not None else None,
            evidence={"onset_step": finding.onset_step, "detected_at_step": finding.detected_at_step,
                      **finding.evidence},
            at_step=active.last_step, state=ProposalState.PROPOSED.value, auto_apply_at=auto_at)
        pid = _pid(prop)
        inc = self.ledger.incident(incident_id)
        evidence = {**((inc.evidence if inc is not None else None) or {}), "proposal": pid}
        if mode is RecoveryMode.OBSERVE:
            self.ledger.update_incident(incident_id, outcome="observed", evidence=evidence)
        else:
            self.ledger.update_incident(incident_id, evidence=evidence)
        if hold:
            if active.group is not None:
                try:
                    active.group.control(ControlKind.PAUSE, {})
                except Exception:  # noqa: BLE001 - a dead or hung group holds by itself
                    log.warning("pause while proposal %s waits failed", pid, exc_info=True)
            self.ledger.set_state(run_id, RunState.NEEDS_ATTENTION, actor=actor,
                                  reason=f"proposal {pid} waits for approval: {decision.reason}")
        self.ledger.event(run_id, actor, "recovery_proposed",
                          {"proposal": pid, "incident": incident_id, "kind": finding.kind, "mode": mode.value,
                           **decision.to_dict(), "auto_apply_at": auto_at.isoformat() if auto_at else None},
                          "held" if hold else "proposed")
        log.warning("proposal %s (%s mode) for incident %s of %s: %s", pid, mode.value, incident_id, run_id,
                    decision.reason)
        self.announce(prop, ProposalState.PROPOSED.value)
        return pid

    def announce(self, prop: Proposal, what: str) -> None:
        if self.on_proposal is None:
            return
        try:
            self.on_proposal(prop, what)
        except Exception:  # noqa: BLE001 - an annotation never stands in the way of a decision
            log.warning("announcing proposal %s (%s) failed", prop.id, what, exc_info=True)

    def carry_out_proposal(self, run_id: str, active: ActiveStage, prop: Proposal, *, actor: str) -> Decision:
        """Carry out an approved proposal exactly as it was recorded (the caller holds the run's
        lock and has checked it still applies: same stage, checkpoint verified)."""
        decision = decision_from_proposal(
            action=prop.action, reason=prop.reason, checkpoint_step=prop.checkpoint_step,
            checkpoint_ref=prop.checkpoint_ref, skip=prop.skip or [], lr_multiplier=prop.lr_multiplier,
            lr_target=prop.lr_target, attempt=prop.attempt, source=prop.source)
        if prop.incident_id is None:
            raise ValueError(f"proposal {prop.id} has no incident")
        self._carry_out(run_id, active, prop.incident_id, prop.kind, decision, actor=actor)
        return decision

    def _supersede(self, run_id: str, stage: str, incident_id: int) -> None:
        """A recovery of the stage is being carried out: proposals still waiting for it are moot."""
        for prop in self.ledger.waiting_proposals(run_id, stage):
            if prop.incident_id == incident_id:
                continue
            note = f"superseded by the recovery of incident {incident_id}"
            prop = self.ledger.update_proposal(run_id, _pid(prop), state=ProposalState.SUPERSEDED.value,
                                               decided_at=self.ledger.now(), decided_by="supervisor", note=note)
            if prop.incident_id is not None:
                inc = self.ledger.incident(prop.incident_id)
                if inc is not None and inc.outcome == "open":
                    self.ledger.update_incident(prop.incident_id, outcome="ignored",
                                                evidence={**(inc.evidence or {}), "closed": note})
            self.ledger.event(run_id, "supervisor", "proposal_superseded",
                              {"proposal": prop.id, "incident": prop.incident_id, "by_incident": incident_id}, "ok")
            self.announce(prop, ProposalState.SUPERSEDED.value)

    # ---- carry out -----------------------------------------------------------------------------
    def _carry_out(self, run_id: str, active: ActiveStage, incident_id: int, kind: str, decision: Decision,
                   *, actor: str) -> None:
        action = decision.action
        if action in (Action.ROLLBACK, Action.RESTART):
            self._supersede(run_id, active.name, incident_id)
            self._recover(run_id, active, incident_id, kind, decision, actor=actor)
        elif action == Action.NEEDS_ATTENTION:
            self.ledger.update_incident(incident_id, action=action.value, outcome="needs_attention",
                                        attempt=decision.attempt)
            if active.group is not None:
                try:
                    active.group.control(ControlKind.PAUSE, {})
                except Exception:  # noqa: BLE001
                    log.exception("pause for needs_attention failed")
            self.ledger.set_state(run_id, RunState.NEEDS_ATTENTION, actor=actor, reason=decision.reason or kind)
        else:  # notify: recorded, nothing to carry out
            self.ledger.update_incident(incident_id, action=action.value, outcome="resolved",
                                        resolved_at=self.ledger.now(), recovery_seconds=0.0)
        self.ledger.event(run_id, actor, "recovery_decision",
                          {"incident": incident_id, "kind": kind, **decision.to_dict(),
                           "checkpoint": decision.checkpoint_ref}, action.value)

    def _recover(self, run_id: str, active: ActiveStage, incident_id: int, kind: str, decision: Decision,
                 *, actor: str) -> None:
        rollback = decision.action == Action.ROLLBACK
        lr = decision.lr_target if decision.lr_target is not None else 1.0
        fields: dict[str, Any] = {"action": decision.action.value, "rollback_to_step": decision.checkpoint_step,
                                  "outcome": "recovering"}
        if rollback:
            fields.update(skip=decision.skip, lr_multiplier=lr, attempt=decision.attempt)
        self.ledger.update_incident(incident_id, **fields)
        if rollback:
            self.ledger.update_run(run_id, lr_multiplier=lr)
        self.ledger.set_state(run_id, RunState.RECOVERING, actor=actor,
                              reason=f"{kind}: {'rollback' if rollback else 'restart worker group'}")
        ckpt = decision.checkpoint_ref
        before = active.pending
        active.pending = PendingRecovery(incident=incident_id, kind=kind, detected_at=time.time(),
                                         target_step=decision.checkpoint_step, checkpoint=ckpt,
                                         from_step=active.last_step, restart=not rollback)
        if before is not None and before.incident != incident_id:
            # the recovery in flight is replaced (its target is no later: see `decide`); it is
            # done when this one is
            active.pending.replaces = {**before.replaces, before.incident: before.detected_at}
        self.metrics.rollbacks.labels(run=run_id, stage=active.name).inc()
        # an operator's rollback of a group shrunk below the stage's world_size (an elastic
        # restart) is carried out by a new group, which takes the full size again where the
        # cluster can place it: how an operator grows a stage back at a checkpoint boundary
        grow = kind == OPERATOR_ROLLBACK and active.shrunk
        if grow:
            log.warning("run %s: operator rollback of %s at %s of %s ranks: restarting the group to grow it back",
                        run_id, active.name, active.world_size, active.declared_world_size)
        if rollback and not grow and self._send_rollback(run_id, active, incident_id, decision, lr):
            return
        active.pending.restart = True
        self.restarter.request_restart(run_id, checkpoint=ckpt, incident=incident_id)

    def _send_rollback(self, run_id: str, active: ActiveStage, incident_id: int, decision: Decision,
                       lr: float) -> bool:
        ref = self.catalog.ref_for(run_id, decision.checkpoint_ref) if decision.checkpoint_ref else None
        if ref is None or active.group is None:
            return False  # to the stage input, or no live group: a new group does it
        try:
            active.group.control(ControlKind.ROLLBACK, {"checkpoint": ref.to_dict(), "skip": decision.skip,
                                                        "lr_multiplier": lr, "incident": incident_id})
            return True
        except Exception as e:  # noqa: BLE001 - dead group: restart with the same decision
            log.warning("rollback control failed (%s); restarting the group instead", e)
            return False

    def give_up(self, run_id: str, active: ActiveStage, reason: str) -> None:
        """The recovery in flight cannot be carried out (its worker groups never came up): the
        incident and the run need an operator, who may resume (a new driver starts the stage
        from its newest good checkpoint)."""
        with self.ledger.lock(run_id):
            pend, active.pending = active.pending, None
            if pend is not None:
                self.ledger.update_incident(pend.incident, outcome="needs_attention")
            self.ledger.set_state(run_id, RunState.NEEDS_ATTENTION, actor="supervisor", reason=reason)

    def recovered(self, active: ActiveStage, *, step: int, at: float) -> None:
        """The recovery in flight took effect at rank 0's `step` (unix time `at`)."""
        pend, active.pending = active.pending, None
        if pend is None:
            return
        secs = max(0.0, at - pend.detected_at)
        for incident, decided in {**pend.replaces, pend.incident: pend.detected_at}.items():
            inc = self.ledger.incident(incident)
            if inc is not None and inc.outcome == "recovering":
                self.ledger.update_incident(incident, outcome="resolved", recovery_seconds=max(0.0, at - decided),
                                            resolved_at=self.ledger.now())
        self.metrics.recovery_seconds.labels(kind=pend.kind).observe(secs)
        if self.ledger.run_state(active.run_id) == RunState.RECOVERING:
            self.ledger.set_state(active.run_id, RunState.RUNNING, actor="supervisor",
                                  reason=f"recovered from {pend.kind}")
        self.ledger.event(active.run_id, "supervisor", "recovered",
                          {"incident": pend.incident, "step": step, "seconds": round(secs, 3)}, "ok")



def _pid(prop: Proposal) -> int:
    if prop.id is None:
        raise ValueError("proposal was never saved")
    return prop.id
