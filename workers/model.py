"""GPT-style decoder, a reward model on top of it, and the few helpers the stages share.

Pre-LN blocks, causal attention through `scaled_dot_product_attention` (flash / memory-
efficient kernels on CUDA, plain math on CPU), learned positions, tied input/output
embeddings. Nothing here names a device or a dtype: the stages put tensors on
`ctx.device` and the harness wraps forward passes in `torch.autocast` on CUDA.

Padding: sequences are right-padded with PAD for training, which causal attention
makes harmless. PPO left-pads prompts of different lengths; for that case every
forward accepts `valid` (B, T) so pads are never attended to and positions restart
at the first real token — the model then sees exactly what it saw unpadded.
"""
from __future__ import annotations

import io
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainguard.workers.spec import ModelSpec
from trainguard.workers.tokenizer import BOS, PAD, SEP, VOCAB_SIZE

__all__ = [
    "GPT",
    "RewardModel",
    "build_gpt",
    "build_reward_model",
    "build_lm",
    "build_scorer",
    "init_weights",
    "lm_loss",
    "token_logprobs",
    "sequence_logprobs",
    "generate",
    "load_model_state",
    "load_weights",
    "count_parameters",
]

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.n_head = spec.n_head
        self.qkv = nn.Linear(spec.d_model, 3 * spec.d_model)
        self.proj = nn.Linear(spec.d_model, spec.d_model)
        self.proj.is_residual_proj = True  # scaled init, see init_weights
        self.dropout = spec.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        # (B, T, D) -> (B, H, T, D/H)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.fc = nn.Linear(spec.d_model, 4 * spec.d_model)
        self.proj = nn.Linear(4 * spec.d_model, spec.d_model)
        self.proj.is_residual_proj = True
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.d_model)
        self.attn = CausalSelfAttention(spec)
        self.ln2 = nn.LayerNorm(spec.d_model)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only language model; `forward(idx) -> logits (B, T, V)`."""

    def __init__(self, spec: ModelSpec, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.spec = spec
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, spec.d_model)
        self.pos_emb = nn.Embedding(spec.seq_len, spec.d_model)
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.lm_head = nn.Linear(spec.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying

    def hidden(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer states (B, T, D) for token ids `idx` (B, T); `valid` (B, T) bool marks non-pad."""
        B, T = idx.shape
        if T > self.spec.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len {self.spec.seq_len}")
        if valid is None:
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
            mask = None
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens start at 0
            mask = _attention_mask(valid)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(idx, valid))  # (B, T, V)


class RewardModel(nn.Module):
    """GPT backbone + scalar head read at the last non-pad token: `forward(idx) -> (B,)`."""

    def __init__(self, spec: ModelSpec, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.backbone = GPT(spec, vocab_size)
        self.head = nn.Linear(spec.d_model, 1)

    def forward(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone.hidden(idx, valid)  # (B, T, D)
        nonpad = idx != PAD if valid is None else valid
        pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)  # (B, T)
        last = torch.where(nonpad, pos, torch.zeros_like(pos)).amax(dim=1)  # (B,)
        h_last = h[torch.arange(idx.shape[0], device=idx.device), last]  # (B, D)
        return self.head(h_last).squeeze(-1).float()  # (B,)


def _attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, no pad keys; every query may see itself so a pad row
    never has zero keys (which would make softmax NaN)."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, None, :]) | eye).contiguous()


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """GPT-2 initialisation drawn from an explicit generator, so weights depend only on the
    seed (never on the global RNG or on the device: draw on CPU, then copy)."""
    n_layer = max((m.spec.n_layer for m in model.modules() if isinstance(m, GPT)), default=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                std = INIT_STD / math.sqrt(2 * n_layer) if getattr(module, "is_residual_proj", False) else INIT_STD
                _normal_(module.weight, std, generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, INIT_STD, generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def _normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    cpu = torch.empty(t.shape, dtype=torch.float32).normal_(0.0, 1.0, generator=generator) * std
    t.copy_(cpu.to(t.device, t.dtype))


def build_gpt(spec: ModelSpec, seed: int, device: torch.device | str = "cpu") -> GPT:
    """A freshly initialised GPT whose weights are a function of `seed` alone."""
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        model = GPT(spec)
    init_weights(model, torch.Generator().manual_seed(seed))
    return model.to(device)


def build_reward_model(spec: ModelSpec, seed: int, device: torch.device | str = "cpu") -> RewardModel:
    with torch.random.fork_rng(devices=[]):
        model = RewardModel(spec)
    init_weights(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.head.weight.zero_()  # every reward starts at 0: no preference before training
    return model.to(device)


def build_lm(spec: ModelSpec, seed: int, device: torch.device | str = "cpu", tokenizer: Any = None) -> nn.Module:
    """The stage's language model: the built-in GPT (`build_gpt`), or with `spec.hf` set a
    Hugging Face causal LM behind the same interface (workers/hf.py; transformers imported
    only then). `tokenizer` is the stage's (ctx.tokenizer), needed for an HF model."""
    if getattr(spec, "hf", None) is None:
        return build_gpt(spec, seed, device)
    from trainguard.workers.hf import build_hf_lm

    return build_hf_lm(spec, tokenizer, seed, device)


def build_scorer(spec: ModelSpec, seed: int, device: torch.device | str = "cpu", tokenizer: Any = None) -> nn.Module:
    """The reward model: `build_reward_model`, or an HF backbone with a scalar head."""
    if getattr(spec, "hf", None) is None:
        return build_reward_model(spec, seed, device)
    from trainguard.workers.hf import build_hf_reward_model

    return build_hf_reward_model(spec, tokenizer, seed, device)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (the tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lm_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of `targets` (B, T) given `inputs` (B, T),
    over the positions where `mask` (B, T) is True (all when None)."""
    logits = model(inputs).float()  # (B, T, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    if mask is None:
        return nll.mean()
    m = mask.reshape(-1).to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1.0)


def token_logprobs(model: nn.Module, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every position: (B, T) -> (B, T-1), float32."""
    v = None if valid is None else valid[:, :-1]
    logits = model(tokens[:, :-1], v).float()  # (B, T-1, V)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)


def sequence_logprobs(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed log-probs of the tokens where `mask` (B, T) is True (the response): (B,).

    mask[:, 0] is ignored (the first token has no prefix to be predicted from)."""
    lp = token_logprobs(model, tokens, valid)  # (B, T-1)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(dim=1)  # (B,)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: torch.Tensor,
    n: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample `n` tokens after `prompt` (B, P) -> (B, P+n), drawing only from `generator`.

    BOS, PAD and SEP are never sampled: a response is bytes, ended by EOS. No KV cache:
    the tiny models recompute the prefix faster than a cache would pay back."""
    tokens = prompt
    valid = torch.ones_like(prompt, dtype=torch.bool) if valid is None else valid
    banned = torch.tensor(list(getattr(model, "banned_token_ids", (BOS, PAD, SEP))), device=prompt.device)
    L = model.spec.seq_len
    for _ in range(n):
        logits = model(tokens[:, -L:], valid[:, -L:])[:, -1, :].float()  # (B, V)
        logits[:, banned] = float("-inf")
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        valid = torch.cat([valid, torch.ones_like(nxt, dtype=torch.bool)], dim=1)
    return tokens


def load_model_state(ref: Any, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (GPT, or RewardModel for reward_model stages): its
    `model.pt`, or the model part of a DCP checkpoint, its bytes checked against the recorded
    hashes in `ref` (a workers.contract.CheckpointRef) before they are deserialized."""
    # lazy: the runtime package imports the stages
    from trainguard.workers.runtime.checkpoint import checkpoint_format, read_verified

    if checkpoint_format(ref) == "dcp":  # the model part of a sharded checkpoint, gathered in this process
        from trainguard.workers.runtime.dcp_store import load_model_state_dict

        return {k: v.to(map_location) for k, v in load_model_state_dict(ref).items()}
    data = io.BytesIO(read_verified(ref, ["model.pt"])["model.pt"])
    return torch.load(data, map_location=map_location, weights_only=True)


def load_weights(model: nn.Module, ref: Any) -> None:
    """Load a checkpoint into `model`, converting between GPT and RewardModel state dicts:
    a RewardModel takes a GPT checkpoint as its backbone (head stays 0), and a GPT takes
    a RewardModel checkpoint's backbone. The state is loaded onto the CPU and copied into
    the parameters by load_state_dict, wherever they are (CUDA included)."""
    state = load_model_state(ref, map_location="cpu")
    is_rm_state = any(k.startswith("backbone.") for k in state)
    is_rm = isinstance(model, RewardModel) or getattr(model, "is_reward_model", False)  # HFRewardModel
    is_lm = isinstance(model, GPT) or getattr(model, "is_causal_lm", False)  # HFCausalLM
    if is_rm and not is_rm_state:
        model.backbone.load_state_dict(state)
    elif is_lm and is_rm_state:
        model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    else:
        model.load_state_dict(state)
