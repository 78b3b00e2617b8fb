"""/api/v1/runs: reads straight from the store, writes through the controller."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Annotated, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request, Response, status
from sqlalchemy.engine import Engine
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from trainguard.service.access import check_pipeline_access
from trainguard.service.api.deps import ControllerDep, OperatorDep, RunDep, SessionDep, SettingsDep, ViewerDep
from trainguard.service.api.schemas import (
    MAX_DB_INT,
    AnnealRequest,
    ProposalDecision,
    RollbackAccepted,
    RollbackRequest,
)
from trainguard.service.db import crud
from trainguard.service.db.models import (
    RUN_STATES,
    CheckpointsPublic,
    EventsPublic,
    IncidentsPublic,
    PROPOSAL_STATES,
    ProposalPublic,
    ProposalsPublic,
    Run,
    RunCreate,
    RunDetailPublic,
    RunPublic,
    RunsPublic,
)
from trainguard.service.errors import Conflict, InvalidRequest
from trainguard.workers.spec import PipelineSpec, parse_pipeline, parse_pipeline_text

router = APIRouter(prefix="/runs", tags=["runs"])


RunStateName = Literal[RUN_STATES]  # type: ignore[valid-type]
ProposalStateName = Literal[PROPOSAL_STATES]  # type: ignore[valid-type]
ProposalIdPath = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="proposal id (see GET /runs/{id}/proposals)")]

# Every list is a page: `count` is the total that matches, `data` at most `limit` of them.
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
Offset = Annotated[int, Query(ge=0, le=MAX_DB_INT, description="rows to skip")]
StageName = Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="only this stage's")]


def _detail(session: SessionDep, run: Run) -> RunDetailPublic:
    session.refresh(run)  # the controller wrote through its own session
    return RunDetailPublic.model_validate(
        {**run.model_dump(), "stages": [s.model_dump() for s in crud.list_stages(session, run_id=run.id)]}
    )


def _parse_body(body: RunCreate) -> PipelineSpec:
    if (body.spec is None) == (body.yaml is None):
        raise InvalidRequest('give exactly one of "spec" (a pipeline mapping) or "yaml" (its text)')
    if body.spec is not None:
        return parse_pipeline(body.spec)
    # Not load_pipeline: it reads a one-line string as a file path, and a request must not name server files.
    return parse_pipeline_text(body.yaml)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunDetailPublic)
def submit_run(
    principal: OperatorDep, body: RunCreate, session: SessionDep, controller: ControllerDep, settings: SettingsDep
):
    """Validate a pipeline spec and start it; 422 names the invalid field, including data and
    checkpoint storage outside the roots this deployment allows."""
    spec = _parse_body(body)  # SpecError is an InvalidRequest-like ValueError: 422
    check_pipeline_access(spec, settings)
    # recovery_mode only when asked for: the controller applies the deployment's default otherwise
    mode = {"recovery_mode": body.recovery_mode} if body.recovery_mode is not None else {}
    run_id = controller.submit(spec, actor=principal.actor, **mode)
    run = crud.get_run(session, run_id=run_id)
    assert run is not None, f"controller.submit returned {run_id} without storing it"
    return _detail(session, run)


PageKey = tuple[int, int, str | None]  # limit, offset, state: everything a page depends on


class RunPageCache:
    """Serialised GET /runs pages of one store, valid while the store's run-list version
    (crud.run_list_version: (epoch, version), bumped by database triggers with every committed
    write to `run`, from any process) is the one they were built under.

    A page is keyed by its query (limit, offset, state); the answer depends on nothing else: every
    caller allowed to list runs (viewer or operator) sees every run, and the auth dependency has
    answered before the cache is asked. Entries built under another version are dropped when a
    page of a new version is stored. At most `max_bytes` of bodies are kept (least recently used
    dropped first). Thread-safe: pages are read and built in the threadpool."""

    def __init__(self, engine: Engine, *, max_bytes: int = 32 << 20) -> None:
        self.engine = engine
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._version: tuple[str, int] | None = None
        self._pages: OrderedDict[PageKey, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, version: tuple[str, int], key: PageKey) -> bytes | None:
        with self._lock:
            if version != self._version:
                return None
            body = self._pages.get(key)
            if body is not None:
                self._pages.move_to_end(key)
            return body

    def put(self, version: tuple[str, int], key: PageKey, body: bytes) -> None:
        """Store `body`, built from rows read after `version` was read (so it is that version's
        page or a newer one's: never older)."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            if version != self._version:
                current = self._version
                if current is not None and current[0] == version[0] and current[1] > version[1]:
                    return  # built under an older version than the entries kept: keep those
                self._version, self._bytes = version, 0
                self._pages.clear()
            old = self._pages.pop(key, None)
            self._bytes += len(body) - (len(old) if old is not None else 0)
            self._pages[key] = body
            while self._bytes > self.max_bytes:
                _, dropped = self._pages.popitem(last=False)
                self._bytes -= len(dropped)


def _page_cache(request: Request) -> RunPageCache | None:
    """The app's page cache (made on first use; event-loop thread only), or None for a store whose
    one connection every session shares (in-memory SQLite): there a reader can see a writer's
    uncommitted rows and version, and a rollback would leave them cached."""
    state = request.app.state
    engine: Engine = state.engine
    if isinstance(engine.pool, (StaticPool, SingletonThreadPool)):
        return None
    cache: RunPageCache | None = getattr(state, "run_page_cache", None)
    if cache is None or cache.engine is not engine:
        cache = state.run_page_cache = RunPageCache(engine)
    return cache


def _serialise_page(rows: list[dict[str, object]], count: int) -> bytes:
    """RunsPublic's JSON without parsing any run's stored spec: each row's fields are serialised by
    RunPublic's own serialiser, the spec text spliced in as stored (the validated PipelineSpec's
    JSON)."""
    items = []
    for row in rows:
        spec = str(row.pop("spec")).encode()
        # store rows: constructed without validation; the spec (excluded here) is spliced in
        head = RunPublic.model_construct(**row).model_dump_json(exclude={"spec"}).encode()
        items.append(head[:-1] + b',"spec":' + spec + b"}")
    return b'{"data":[' + b",".join(items) + b'],"count":' + str(count).encode() + b"}"


def _runs_page(engine: Engine, cache: RunPageCache | None, key: PageKey) -> bytes:
    limit, offset, state = key
    with engine.connect() as conn:
        version = crud.run_list_version(conn) if cache is not None else None
        if cache is not None and version is not None:
            body = cache.get(version, key)
            if body is not None:
                return body
        # the rows are read after the version: the page is that version's or newer
        with Session(bind=conn) as session:
            rows = crud.list_run_rows(session, limit=limit, offset=offset, state=state)
            count = crud.count_runs(session, state=state)
    body = _serialise_page(rows, count)
    if cache is not None and version is not None:
        cache.put(version, key, body)
    return body


@router.get("", response_model=RunsPublic)
async def list_runs(
    _: ViewerDep,
    request: Request,
    limit: Limit = 100,
    offset: Offset = 0,
    state: RunStateName | None = None,
) -> Response:
    """Newest first. Answered as RunsPublic (the body is built without parsing any run's stored
    spec) from a cache of serialised pages keyed by the query and by a version of the `run` table
    that every committed write to it changes, from any process (RunPageCache): a page costs one
    version query while no run changed, a few milliseconds otherwise (tests/bench api_latency)."""
    key: PageKey = (limit, offset, state)
    body = await run_in_threadpool(_runs_page, request.app.state.engine, _page_cache(request), key)
    return Response(body, media_type="application/json")


@router.get("/{run_id}", response_model=RunDetailPublic)
def get_run(_: ViewerDep, run: RunDep, session: SessionDep):
    return _detail(session, run)


@router.post("/{run_id}/pause", status_code=status.HTTP_202_ACCEPTED, response_model=RunDetailPublic)
def pause_run(principal: OperatorDep, run: RunDep, session: SessionDep, controller: ControllerDep):
    """Pause at the next step boundary (every rank at the same step)."""
    controller.pause(run.id, actor=principal.actor)
    return _detail(session, run)


@router.post("/{run_id}/resume", status_code=status.HTTP_202_ACCEPTED, response_model=RunDetailPublic)
def resume_run(principal: OperatorDep, run: RunDep, session: SessionDep, controller: ControllerDep):
    controller.resume(run.id, actor=principal.actor)
    return _detail(session, run)


@router.post("/{run_id}/stop", status_code=status.HTTP_202_ACCEPTED, response_model=RunDetailPublic)
def stop_run(principal: OperatorDep, run: RunDep, session: SessionDep, controller: ControllerDep):
    controller.stop(run.id, actor=principal.actor)
    return _detail(session, run)


@router.post("/{run_id}/anneal", status_code=status.HTTP_202_ACCEPTED, response_model=RunDetailPublic)
def anneal_run(principal: OperatorDep, run: RunDep, body: AnnealRequest, session: SessionDep, controller: ControllerDep):
    """Anneal the running stage: LR decays to `final_lr` over `steps`, optionally on a new mixture."""
    known = {"web", "curated", *json.loads(run.spec).get("data", {})}
    unknown = body.unknown_sources(known)
    if unknown:
        raise InvalidRequest(f"mixture names unknown source(s) {unknown} (known: {sorted(known)})")
    controller.anneal(
        run.id,
        steps=body.steps,
        final_lr=body.final_lr,
        schedule=body.schedule,
        mixture=body.mixture,
        actor=principal.actor,
    )
    return _detail(session, run)


@router.post("/{run_id}/rollback", status_code=status.HTTP_202_ACCEPTED, response_model=RollbackAccepted)
def rollback_run(
    principal: OperatorDep,
    run: RunDep,
    session: SessionDep,
    controller: ControllerDep,
    body: Annotated[RollbackRequest | None, Body()] = None,
):
    """Roll back to `checkpoint_id` (one of this run's live checkpoints), or to the newest good
    checkpoint; by default skip the batches since then and apply the policy's LR backoff."""
    body = body or RollbackRequest()
    if body.checkpoint_id is not None:
        ckpt = crud.get_checkpoint(session, run_id=run.id, checkpoint_id=body.checkpoint_id)
        if ckpt is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                detail=f"checkpoint {body.checkpoint_id} not found in run {run.id}")
        if ckpt.deleted_at is not None:
            raise Conflict(f"checkpoint {body.checkpoint_id} was deleted (retention); pick a live one")
    result = controller.rollback(run.id, checkpoint_id=body.checkpoint_id, skip=body.skip,
                                 lr_multiplier=body.lr_multiplier, actor=principal.actor)
    return RollbackAccepted.model_validate({"run_id": run.id, **result})


@router.get("/{run_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(
    _: ViewerDep,
    run: RunDep,
    session: SessionDep,
    stage: StageName = None,
    include_deleted: Annotated[bool, Query(alias="all", description="also the ones retention deleted")] = False,
    limit: Limit = 100,
    offset: Offset = 0,
):
    """The run's checkpoints, oldest first: the live ones, or with `all=true` the history too."""
    where = dict(run_id=run.id, stage_name=stage, include_deleted=include_deleted)
    rows = crud.list_checkpoints(session, **where, limit=limit, offset=offset)
    return CheckpointsPublic(data=rows, count=crud.count_checkpoints(session, **where))


@router.get("/{run_id}/incidents", response_model=IncidentsPublic)
def list_incidents(
    _: ViewerDep, run: RunDep, session: SessionDep, open_only: bool = False, limit: Limit = 100, offset: Offset = 0
):
    rows = crud.list_incidents(session, run_id=run.id, open_only=open_only, limit=limit, offset=offset)
    return IncidentsPublic(data=rows, count=crud.count_incidents(session, run_id=run.id, open_only=open_only))


@router.get("/{run_id}/events", response_model=EventsPublic)
def list_events(_: ViewerDep, run: RunDep, session: SessionDep, limit: Limit = 100, offset: Offset = 0):
    """The audit log, oldest first."""
    rows = crud.list_events(session, run_id=run.id, limit=limit, offset=offset)
    return EventsPublic(data=rows, count=crud.count_events(session, run_id=run.id))


# --- recovery proposals (approve / observe modes) ----------------------------------------


def _proposal_or_404(session: SessionDep, run: Run, proposal_id: int):
    prop = crud.get_proposal(session, run_id=run.id, proposal_id=proposal_id)
    if prop is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"proposal {proposal_id} not found in run {run.id}")
    return prop


@router.get("/{run_id}/proposals", response_model=ProposalsPublic)
def list_proposals(
    _: ViewerDep,
    run: RunDep,
    session: SessionDep,
    state: ProposalStateName | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
):
    """Recoveries the run's mode (approve, observe) recorded instead of carrying out, oldest first."""
    rows = crud.list_proposals(session, run_id=run.id, state=state, limit=limit, offset=offset)
    return ProposalsPublic(data=rows, count=crud.count_proposals(session, run_id=run.id, state=state))


@router.post("/{run_id}/proposals/{proposal_id}/{decision}", status_code=status.HTTP_202_ACCEPTED,
             response_model=ProposalPublic)
def decide_proposal(
    principal: OperatorDep,
    run: RunDep,
    session: SessionDep,
    controller: ControllerDep,
    proposal_id: ProposalIdPath,
    decision: Annotated[Literal["approve", "reject"], Path(description="approve: carry it out; reject: decline it")],
    body: Annotated[ProposalDecision | None, Body()] = None,
):
    """`approve`: carry the proposal out exactly as recorded (its checkpoint, verified again
    first, its skip ranges and LR multiplier). `reject`: decline it; nothing is carried out and
    the run stays as it is (a run approve mode held stays needs_attention: resume, roll back or
    stop it). 409, with nothing changed, when it was decided already, or (approve) was made in
    observe mode or no longer applies (the run ended or moved on, the checkpoint is gone; the
    proposal is then marked expired). One operation for both keeps the contract tests short."""
    prop = _proposal_or_404(session, run, proposal_id)
    act = controller.approve_proposal if decision == "approve" else controller.reject_proposal
    act(run.id, proposal_id, actor=principal.actor, note=(body or ProposalDecision()).note)
    session.refresh(prop)  # the controller wrote through its own session
    return prop
