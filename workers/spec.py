"""Pipeline specification: the YAML a user submits, parsed and validated before anything starts.

Errors name the field (pydantic's location, e.g. `stages.1.steps`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from trainguard.workers.contract import FaultKind

__all__ = [
    "HF_ARCHITECTURES",
    "HF_OFFLINE_ENV",
    "HFModelSpec",
    "ModelSpec",
    "CheckpointSpec",
    "FaultSpec",
    "ParallelSpec",
    "PlacementSpec",
    "CustomStage",
    "LoopStage",
    "USER_CODE_KINDS",
    "StageSpec",
    "PipelineSpec",
    "SpecError",
    "load_pipeline",
    "parse_pipeline",
    "parse_pipeline_text",
]

# A spec error names at most this many fields, each location and message cut short: a
# request of a few hundred kilobytes can hold a hundred thousand bad entries, and the
# answer must stay small.
MAX_ERRORS_SHOWN = 20
_MAX_LOC_CHARS = 200
_MAX_MSG_CHARS = 300


class SpecError(ValueError):
    """A pipeline spec that cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Architectures a fresh `model.hf.config` may name (transformers `model_type`s whose configs
# and causal-LM classes ship with transformers: no remote code).
HF_ARCHITECTURES = ("llama", "mistral", "qwen2")
# The Ray workers' environment (workers/group.py): a model is read from its folder, never fetched.
HF_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# Set from the tokenizer, never from the YAML.
_HF_CONFIG_RESERVED = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "model_type",
                       "auto_map", "trust_remote_code", "architectures")


class HFModelSpec(_Strict):
    """A Hugging Face causal LM: `path` (a local folder with config, safetensors weights and a
    tokenizer) or `config` (a fresh model: `architecture` plus config fields, e.g. hidden_size);
    a fresh model's tokenizer is a byte-level BPE trained on the pipeline's corpora."""

    path: str | None = Field(None, description="local model folder (from_pretrained, local files only, safetensors)")
    config: dict[str, Union[bool, int, float, str]] | None = Field(
        None, description="fresh model: {architecture: llama|mistral|qwen2, hidden_size: ..., ...}")
    tokenizer_vocab_size: int = Field(512, ge=300, le=65536, description="fresh model: BPE vocabulary size")

    @model_validator(mode="after")
    def _one_source(self) -> "HFModelSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.hf.path (a local folder) or model.hf.config (a fresh model)")
        if self.path is not None and (not self.path.startswith("/") or "://" in self.path):
            raise ValueError(f"model.hf.path must be an absolute local folder, not {self.path[:120]!r}")
        if self.config is not None:
            arch = self.config.get("architecture")
            if arch not in HF_ARCHITECTURES:
                raise ValueError(f"model.hf.config.architecture must be one of {list(HF_ARCHITECTURES)}, not {arch!r}")
            for key in _HF_CONFIG_RESERVED:
                if key in self.config:
                    raise ValueError(f"model.hf.config.{key} may not be set (it comes from the tokenizer or the architecture)")
        return self


class ModelSpec(_Strict):
    """GPT decoder size. Tiny on CPU; the same code scales on GPU. With `hf` set, the stages
    train that Hugging Face model instead (n_layer, n_head, d_model, dropout do not apply;
    seq_len is still the training window)."""

    n_layer: int = Field(2, ge=1, le=256)
    n_head: int = Field(2, ge=1, le=256)
    d_model: int = Field(64, ge=8, le=65536)
    seq_len: int = Field(64, ge=8, le=1 << 20)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    hf: HFModelSpec | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.hf is not None:
            unused = sorted(f for f in ("n_layer", "n_head", "d_model", "dropout")
                            if getattr(self, f) != type(self).model_fields[f].default)
            if unused:
                raise ValueError(f"model.{unused[0]} does not apply to a Hugging Face model (model.hf); "
                                 f"size it in model.hf.config")
            mpe = (self.hf.config or {}).get("max_position_embeddings")
            if isinstance(mpe, int) and mpe < self.seq_len:
                raise ValueError(f"model.hf.config.max_position_embeddings ({mpe}) is below model.seq_len ({self.seq_len})")
            return self
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_hf(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a built-in-GPT spec dumps exactly as before `hf` existed
        data = handler(self)
        if isinstance(data, dict) and data.get("hf", 0) is None:
            del data["hf"]
        return data


class CheckpointSpec(_Strict):
    every: int = Field(20, ge=1, description="save every N optimizer steps")
    keep_last: int = Field(3, ge=1, description="retention: keep the last K (plus any marked keep)")
    storage: str | None = Field(None, description="local folder or fsspec URL; default: <state>/checkpoints")
    asynchronous: bool = True
    in_memory: int = Field(
        2, ge=0, le=8, description="rollbacks: every rank keeps a host-memory copy of the newest N checkpoints "
                                   "(torch format, unsharded) and rolls back to one of them without reading it "
                                   "back; each copy costs the model's and optimizer's size in host memory per "
                                   "rank; 0: off")
    format: Literal["auto", "torch", "dcp"] = Field(
        "auto", description="torch: whole .pt files written by rank 0; dcp: torch.distributed.checkpoint, "
                            "each rank writes its shards (local or shared filesystem only); auto: dcp for "
                            "parallel.strategy fsdp, torch otherwise. Loads follow the checkpoint's own format.")


class FaultSpec(_Strict):
    """One injected fault. `at_step` is a batch index in the unskipped data order (equal to
    the optimizer step while nothing has been skipped) — except for a loss_spike in
    `lr_burst` mode, which is keyed on the optimizer step (a schedule problem, not bad data)."""

    kind: FaultKind
    at_step: int = Field(ge=0)
    rank: int = Field(0, ge=0)
    duration: int = Field(1, ge=1, description="steps the fault lasts (loss_spike, nan, slow)")
    mode: Literal["corrupt_batches", "lr_burst"] = Field(
        "corrupt_batches", description="loss_spike: corrupt the batches (skippable) or burst the LR"
    )
    factor: float = Field(0.0, ge=0.0, description="loss_spike lr_burst multiplier / slow seconds per step; 0 = default")
    once: bool = Field(True, description="fire once per run (hardware faults); False: every time the step is reached")


class ParallelSpec(_Strict):
    """How the ranks of a stage share the model (workers/runtime/distributed.py `wrap_model`).
    `none` (default): every rank holds the whole model; the harness averages gradients in one
    flat all-reduce. `ddp`: the whole model on every rank, gradients averaged by torch's DDP
    (composable `replicate`) during backward. `fsdp`: FSDP2 (`fully_shard` on each transformer
    block and on the root): parameters, gradients and optimizer state sharded over the ranks
    (bf16 compute with fp32 reduction on GPUs with native bf16). No effect at world_size 1."""

    strategy: Literal["none", "ddp", "fsdp"] = "none"


class PlacementSpec(_Strict):
    """Gang scheduling of a stage's worker group (workers/group.py): one Ray placement group with a
    bundle per rank, reserved all at once before any rank starts — a group that cannot get all of
    it within $TRAINGUARD_PLACEMENT_WAIT_S is an `insufficient_resources` incident, never half a
    group. `strategy`: PACK (as few nodes as possible), SPREAD (across nodes where it can),
    STRICT_PACK (one node), STRICT_SPREAD (one node per rank). `cpus_per_rank`: logical CPUs in
    each rank's bundle; default 1 for a CPU group and 0 for a GPU group (its bundle holds its GPU);
    0 on a CPU group turns gang scheduling off (ranks are 0-CPU actors placed anywhere)."""

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    cpus_per_rank: float | None = Field(None, ge=0.0, le=1024.0,
                                        description="logical CPUs per rank's bundle; default 1 (CPU) / 0 (GPU)")

    def cpus(self, use_gpu: bool) -> float:
        return self.cpus_per_rank if self.cpus_per_rank is not None else (0.0 if use_gpu else 1.0)


StageKindName = Literal["pretrain", "anneal", "sft", "reward_model", "ppo", "dpo", "custom", "loop"]
USER_CODE_KINDS = ("custom", "loop")  # stage kinds that run a user's entrypoint
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
OptionValue = Union[bool, int, float, str, None]


class _StageBase(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    steps: int = Field(gt=0, le=10_000_000)
    world_size: int = Field(1, ge=1, le=4096)
    min_world_size: int | None = Field(
        None, ge=1, le=4096,
        description="elastic restart: when the cluster cannot place world_size ranks for any group of the stage but "
                    "its first (a restart after a crash, a hang or a lost node, a resume), start at the largest size "
                    "that fits, not below this; the global batch is kept (pretrain and anneal accumulate gradients "
                    "over micro-batches of the full-size share); default: world_size only")
    batch_size: int = Field(8, ge=1, le=1 << 20)
    micro_batch_size: int | None = Field(
        None, ge=1, le=1 << 20,
        description="gradient accumulation: samples per micro-step within a rank's share; default: the whole share")
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.1, ge=0.0, le=10.0)
    grad_clip: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    eval_every: int = Field(25, ge=1)
    eval_batches: int = Field(4, ge=1)
    mixture: dict[str, float] = Field(default_factory=lambda: {"web": 0.7, "curated": 0.3})
    init_from: str | None = Field(None, description="stage name whose output checkpoint this one starts from; default: the previous stage")
    checkpoint: CheckpointSpec | None = None
    faults: list[FaultSpec] = Field(default_factory=list)
    step_delay: float = Field(0.0, ge=0.0, le=60.0, description="extra seconds per step (demo pacing)")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec, description="none | ddp | fsdp (see ParallelSpec)")
    placement: PlacementSpec = Field(default_factory=PlacementSpec,
                                     description="gang scheduling: {strategy: PACK|SPREAD|..., cpus_per_rank} "
                                                 "(see PlacementSpec)")

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("mixture must name at least one source")
        for k, w in v.items():
            if w < 0:
                raise ValueError(f"mixture weight for {k!r} is negative")
        if sum(v.values()) <= 0:
            raise ValueError("mixture weights sum to zero")
        return v

    @model_validator(mode="after")
    def _faults_in_range(self) -> "_StageBase":
        for i, f in enumerate(self.faults):
            if f.at_step >= self.steps:
                raise ValueError(f"faults.{i}.at_step ({f.at_step}) is past the stage's steps ({self.steps})")
            if f.rank >= self.world_size:
                raise ValueError(f"faults.{i}.rank ({f.rank}) is not below world_size ({self.world_size})")
        if self.min_world_size is not None and self.min_world_size > self.world_size:
            raise ValueError(f"min_world_size ({self.min_world_size}) is above world_size ({self.world_size})")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) is above batch_size ({self.batch_size})")
        if self.micro_batch_size is not None and getattr(self, "kind", None) not in ("pretrain", "anneal"):
            raise ValueError(f"micro_batch_size: gradient accumulation is implemented for pretrain and anneal "
                             f"stages only, not {getattr(self, 'kind', None)!r}")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_micro(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a stage without gradient accumulation dumps exactly as before micro_batch_size existed
        data = handler(self)
        for opt in ("micro_batch_size", "min_world_size"):
            if isinstance(data, dict) and opt in data and data[opt] is None:
                del data[opt]
        # ... and without a placement option, exactly as before placement existed
        if isinstance(data, dict) and data.get("placement") == PlacementSpec().model_dump():
            del data["placement"]
        return data


class PretrainStage(_StageBase):
    kind: Literal["pretrain"]


class AnnealStage(_StageBase):
    kind: Literal["anneal"]
    final_lr: float = Field(1e-5, ge=0.0)
    schedule: Literal["linear", "cosine", "exponential"] = "linear"
    mixture: dict[str, float] = Field(default_factory=lambda: {"curated": 0.9, "web": 0.1})


class SFTStage(_StageBase):
    kind: Literal["sft"]


class RewardModelStage(_StageBase):
    kind: Literal["reward_model"]


class PPOStage(_StageBase):
    kind: Literal["ppo"]
    reward_model: str | None = Field(None, description="stage name of the reward model; default: the last reward_model stage before")
    reference: str | None = Field(None, description="stage name of the frozen reference (SFT); default: the last sft stage before")
    kl_target: float = Field(0.5, gt=0.0)
    kl_coef: float = Field(0.1, ge=0.0)
    kl_horizon: int = Field(50, ge=1)
    response_len: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature; the ratio and the KL estimate are of the "
                                                          "untempered policy, so only 1.0 samples on-policy")
    ppo_epochs: int = Field(2, ge=1, le=64, description="passes over each rollout (optimizer steps per rollout = "
                                                        "ppo_epochs x minibatches)")
    minibatches: int = Field(2, ge=1, le=1024, description="minibatches each rank's share of a rollout is split into")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount over response tokens")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range of the policy ratio")
    value_clip: float = Field(0.2, gt=0.0, description="clip range of the value prediction (PPO2 value clipping)")
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the value loss in the stage loss")
    ptx_coef: float = Field(0.5, ge=0.0, description="weight of the ptx term (next-token loss on an SFT batch, InstructGPT's "
                                                      "PPO-ptx); 0 turns it off (the corrupted-batch fault then only negates advantages)")
    value_lr: float = Field(1e-3, gt=0.0, le=10.0, description="AdamW learning rate of the value head (its own optimizer)")

    @model_validator(mode="after")
    def _minibatches_fit(self) -> "PPOStage":
        if self.minibatches * self.world_size > self.batch_size:
            raise ValueError(f"minibatches ({self.minibatches}) x world_size ({self.world_size}) is above "
                             f"batch_size ({self.batch_size}): every minibatch needs a prompt on every rank")
        return self


class DPOStage(_StageBase):
    kind: Literal["dpo"]
    reference: str | None = Field(None, description="stage name of the frozen reference (SFT); default: the last sft stage before")
    beta: float = Field(0.1, gt=0.0)


class _UserCodeStage(_StageBase):
    entrypoint: str = Field(max_length=300, pattern=ENTRYPOINT_PATTERN,
                            description="module:attribute the workers import; the module must be under one of the "
                                        "deployment's TRAINGUARD_USER_CODE_MODULES")
    options: dict[str, OptionValue] = Field(default_factory=dict, max_length=256,
                                            description="the user code's own settings (ctx.options / g.options)")

    @field_validator("options")
    @classmethod
    def _option_names(cls, v: dict[str, OptionValue]) -> dict[str, OptionValue]:
        for k, val in v.items():
            if not k or len(k) > 100:
                raise ValueError(f"option name {k[:100]!r} must be 1-100 characters")
            if isinstance(val, str) and len(val) > 4096:
                raise ValueError(f"option {k!r} is longer than 4096 characters")
        return v


class CustomStage(_UserCodeStage):
    """A user's stage: `entrypoint: package.module:ClassName`, a subclass of
    trainguard.workers.stages.base.Stage (the versioned stage interface, docs/user-code.md).
    The harness runs the loop; the stage gives the objective."""

    kind: Literal["custom"]


class LoopStage(_UserCodeStage):
    """A user's own training loop: `entrypoint: package.module:function`, called with the loop
    API's context (trainguard.workers.runtime.loop.Guarded). Gradients are averaged by the
    guard (parallel: none only)."""

    kind: Literal["loop"]

    @model_validator(mode="after")
    def _flat_only(self) -> "LoopStage":
        if self.parallel.strategy != "none":
            raise ValueError(f"parallel.strategy {self.parallel.strategy!r}: a loop stage's gradients are averaged by "
                             f"the loop API (g.step); only 'none' is supported")
        return self


StageSpec = Annotated[
    Union[PretrainStage, AnnealStage, SFTStage, RewardModelStage, PPOStage, DPOStage, CustomStage, LoopStage],
    Field(discriminator="kind"),
]


class PipelineSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    seed: int = Field(0, ge=0, lt=2**31)
    model: ModelSpec = Field(default_factory=ModelSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    data: dict[str, str] = Field(
        default_factory=dict,
        description="extra sources: name -> path of a .txt or .jsonl file ({'text': ...} per line), "
                    "or of pre-tokenized token shards (a .bin file or a folder of them; `trainguard tokenize`)",
    )
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> "PipelineSpec":
        names = [s.name for s in self.stages]
        seen: set[str] = set()
        for i, s in enumerate(self.stages):
            if s.name in seen:
                raise ValueError(f"stages.{i}.name {s.name!r} is used twice")
            for attr in ("init_from", "reward_model", "reference"):
                ref = getattr(s, attr, None)
                if ref is not None and ref not in seen:
                    raise ValueError(f"stages.{i}.{attr} {ref!r} names no earlier stage (earlier: {sorted(seen)})")
            seen.add(s.name)
            # a pretrained Hugging Face folder is where SFT or a reward model may start; PPO and
            # DPO need an earlier stage's policy (and reward model / reference)
            from_folder = getattr(self.model.hf, "path", None) is not None and s.kind in ("sft", "reward_model")
            if s.kind not in ("pretrain", *USER_CODE_KINDS) and i == 0 and s.init_from is None and not from_folder:
                raise ValueError(f"stages.0 ({s.kind}) needs an earlier stage to start from; the first stage must be "
                                 f"pretrain (or sft / reward_model from a pretrained model.hf.path)")
            ck = self.checkpoint_for(s)
            if self.checkpoint_format(s) == "dcp" and ck.storage and "://" in ck.storage \
                    and not ck.storage.startswith("file://"):
                where = "stages.{i}.checkpoint" if s.checkpoint is not None else "checkpoint"
                raise ValueError(f"{where.format(i=i)}.storage {ck.storage!r}: DCP checkpoints (format dcp, the "
                                 f"default with parallel.strategy fsdp) need a local or shared filesystem")
            known = {"web", "curated", *self.data}
            for src in s.mixture:
                if src not in known:
                    raise ValueError(f"stages.{i}.mixture names unknown source {src!r} (known: {sorted(known)})")
        del names
        return self

    def stage(self, name: str) -> Any:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def checkpoint_for(self, stage: Any) -> CheckpointSpec:
        return stage.checkpoint or self.checkpoint

    def checkpoint_format(self, stage: Any) -> str:
        """The format `stage` writes: `checkpoint.format`, with auto = dcp under FSDP2."""
        fmt = self.checkpoint_for(stage).format
        if fmt == "auto":
            return "dcp" if stage.parallel.strategy == "fsdp" else "torch"
        return fmt


def _format(err: ValidationError) -> str:
    errors = err.errors(include_url=False, include_input=False)
    parts = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{_cut(loc, _MAX_LOC_CHARS)}: {_cut(e['msg'], _MAX_MSG_CHARS)}")
    if len(errors) > MAX_ERRORS_SHOWN:
        parts.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "invalid pipeline spec: " + "; ".join(parts)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_pipeline(data: Any) -> PipelineSpec:
    """Validate a parsed YAML/JSON document; raises SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError("invalid pipeline spec: the top level must be a mapping")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format(e)) from None
    except RecursionError:
        raise SpecError("invalid pipeline spec: nested too deeply") from None


def parse_pipeline_text(text: str) -> PipelineSpec:
    """Validate YAML (or JSON) text; never reads a file, whatever the text looks like."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"invalid pipeline spec: not valid YAML: {_cut(str(e), 1000)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise SpecError("invalid pipeline spec: the YAML is nested too deeply") from None
    return parse_pipeline(data)


def load_pipeline(source: str | Path) -> PipelineSpec:
    """Load from a YAML file path, or from YAML text when `source` is not an existing file.

    For trusted local callers (the CLI's own files, the demo): a request from the network
    goes through parse_pipeline_text, which never treats its text as a path."""
    p = Path(source) if not (isinstance(source, str) and "\n" in source) else None
    text = p.read_text() if p is not None and p.exists() else str(source)
    return parse_pipeline_text(text)
