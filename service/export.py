"""`trainguard export RUN --stage NAME --to DIR`: a stage's checkpoint as a Hugging Face folder.

Runs locally, like `analyze`: it reads the run's spec and checkpoint records from the store
(TRAINGUARD_DATABASE_URL, default SQLite under TRAINGUARD_STATE_DIR, or --state-dir) and the
checkpoint files from storage. The weights are loaded through the verified path
(`workers.model.load_model_state(ref)`: every byte checked against the hashes recorded when
the worker reported the checkpoint), then written with `save_pretrained` (config, safetensors)
next to the tokenizer (the model folder's, or the run's trained BPE). Only stages of a
pipeline with `model.hf` can be exported; a reward model exports its language-model backbone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_export_parser", "run_export", "export_checkpoint"]


class ExportError(Exception):
    pass


def add_export_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a stage's checkpoint as a Hugging Face model folder",
                       description="write a stage's output checkpoint (or --checkpoint ID) as a Hugging Face "
                                   "folder that from_pretrained loads; reads the local store")
    p.add_argument("run", metavar="RUN", help="run id (run-<12 hex>)")
    p.add_argument("--stage", required=True, metavar="NAME", help="stage name")
    p.add_argument("--to", required=True, type=Path, metavar="DIR", help="output folder (created; must be empty)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="ID",
                   help="a good checkpoint of the stage (see `checkpoints RUN`); default: the stage's output")
    p.add_argument("--state-dir", type=Path, default=None, help="default: TRAINGUARD_STATE_DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def export_checkpoint(run_id: str, stage_name: str, out_dir: Path, *, checkpoint_id: int | None = None,
                      state_dir: Path | None = None) -> dict[str, Any]:
    """Export and return {"run", "stage", "step", "checkpoint", "path"}; ExportError names what is wrong."""
    from sqlmodel import Session

    from trainguard.service.config import Settings
    from trainguard.service.db import crud
    from trainguard.service.db.engine import make_engine
    from trainguard.workers.contract import CheckpointRef
    from trainguard.workers.spec import parse_pipeline

    settings = Settings(**({"state_dir": state_dir} if state_dir is not None else {}))
    engine = make_engine(settings.database_url)
    try:
        with Session(engine) as s:
            run = crud.get_run(s, run_id=run_id)
            if run is None:
                raise ExportError(f"no run {run_id!r} in {settings.database_url}")
            spec = parse_pipeline(json.loads(run.spec))
            if spec.model.hf is None:
                raise ExportError("export needs a Hugging Face model: this run trains the built-in GPT "
                                  "(model.hf in the pipeline; see README, 'Guarding a Hugging Face model')")
            stage = crud.get_stage(s, run_id=run_id, name=stage_name)
            if stage is None:
                raise ExportError(f"run {run_id} has no stage {stage_name!r} (stages: {[st.name for st in spec.stages]})")
            if checkpoint_id is not None:
                row = crud.get_checkpoint(s, run_id=run_id, checkpoint_id=checkpoint_id)
                if row is None or row.stage_name != stage_name:
                    raise ExportError(f"checkpoint {checkpoint_id} is not a checkpoint of stage {stage_name!r} of {run_id}")
            else:
                if not stage.output_checkpoint:
                    raise ExportError(f"stage {stage_name!r} of {run_id} has no output checkpoint yet "
                                      f"(state {stage.state!r}); name one with --checkpoint ID")
                row = crud.find_checkpoint(s, run_id=run_id, path=stage.output_checkpoint, stage_name=stage_name)
                if row is None:
                    raise ExportError(f"the output checkpoint of stage {stage_name!r} is not registered")
            if row.bad_reason or row.deleted_at is not None or not row.files:
                why = row.bad_reason or ("deleted" if row.deleted_at is not None else "no recorded hashes")
                raise ExportError(f"checkpoint {row.id} cannot be exported: {why}")
            ref = CheckpointRef(row.path, dict(row.files))
            step, ckpt_id = row.step, row.id
    finally:
        engine.dispose()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder")

    from trainguard.workers.hf import export_hf, tokenizer_dir
    from trainguard.workers.model import load_model_state
    from trainguard.workers.runtime.checkpoint import CheckpointError

    try:
        state = load_model_state(ref)  # verified against the recorded hashes before deserializing
    except CheckpointError as e:
        raise ExportError(f"checkpoint {ckpt_id} failed verification: {e}") from None
    tok = spec.model.hf.path or tokenizer_dir(settings.state_dir, run_id)
    export_hf(spec.model, state, tok, out)
    return {"run": run_id, "stage": stage_name, "step": step, "checkpoint": ckpt_id, "path": str(out.resolve())}


def run_export(args: argparse.Namespace) -> int:
    from trainguard.service.cli import CliError

    try:
        result = export_checkpoint(args.run, args.stage, args.to, checkpoint_id=args.checkpoint,
                                   state_dir=args.state_dir)
    except (ExportError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exported {result['run']} stage {result['stage']} step {result['step']} "
              f"(checkpoint {result['checkpoint']}) to {result['path']}")
    return 0
