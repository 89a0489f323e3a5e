"""The LLaMA-family decoder behind every SPHINX-X model, and its checkpoint loading.

Read top to bottom: config and named sizes, the decoder pieces in the order data
flows through them (RMSNorm -> RoPE -> attention with a KV cache -> SwiGLU FFN ->
block -> Transformer), then loading safetensors in the layouts users download
(HF Llama / TinyLlama / LLaMA-2, InternLM2, Mixtral) and our own checkpoint format.
Parameter names follow the LLaMA2-Accessory reference code (wq/wk/wv/wo, w1/w2/w3).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe import MoEFeedForward

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8          # < n_heads: grouped-query attention
    vocab_size: int = 32000
    ffn_dim: int = 688           # SwiGLU hidden width (per expert for MoE)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    n_experts: int = 0           # 0: dense FFN; >0: Mixtral sparse MoE (moe.py)
    top_k: int = 2               # experts per token; changeable at inference (paper A.1)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "dim must divide by n_heads and n_heads by n_kv_heads")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..n_experts ({self.n_experts})")


# The paper's LLMs (exact published configs) and small sizes that train on a CPU.
LLM_CONFIGS: dict[str, ModelConfig] = {
    "tinyllama-1.1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                                  ffn_dim=5632, max_seq_len=2048),
    "internlm2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=92544,
                                ffn_dim=14336, rope_theta=1e6, max_seq_len=32768),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000,
                              ffn_dim=13824, max_seq_len=4096),
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000,
                                ffn_dim=14336, rope_theta=1e6, max_seq_len=32768, n_experts=8, top_k=2),
    "tiny": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, ffn_dim=688,
                        max_seq_len=1024, tie_embeddings=True),
    "tiny-moe": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, ffn_dim=344,
                            max_seq_len=1024, tie_embeddings=True, n_experts=4, top_k=2),
}


def llm_config(name: str, **overrides) -> ModelConfig:
    if name not in LLM_CONFIGS:
        raise KeyError(f"unknown LLM size {name!r}; known: {', '.join(LLM_CONFIGS)}")
    return replace(LLM_CONFIGS[name], **overrides)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 variance underflows), scale in the input dtype, as the LLaMA reference.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables for rotary embeddings at the given absolute positions.

    Computed per forward instead of stored as buffers: a model built on the meta
    device then needs no buffer re-initialisation, and the cost is one tiny outer product.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)            # the half-split ("rotate_half") layout of HF weights
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd). Pairs are (i, i + hd/2), the layout HF-format Llama/InternLM2 checkpoints use.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Pre-allocated keys and values of one attention layer for incremental decoding."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        # Under tensor parallelism (train.py) each rank holds n_heads/tp query heads and, when
        # divisible, n_kv_heads/tp kv heads; wq/wk/wv are column-split and wo row-split.
        self.n_heads = cfg.n_heads // tp_size
        self.n_kv_heads = cfg.n_kv_heads // tp_size if cfg.n_kv_heads % tp_size == 0 else cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        if start_pos == 0 or T == 1:
            # A fresh sequence is plain causal; a single new token may see the whole cache.
            mask, causal = None, T > 1
        else:
            # A chunk appended to a cache: query i sits at absolute position start_pos + i.
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(start_pos)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Under TP, w1/w3 are column-split and w2 row-split."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int = 1):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, tp_size)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:
            self.feed_forward = MoEFeedForward(cfg.dim, cfg.ffn_dim // tp_size, cfg.n_experts, cfg.top_k)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim // tp_size)

    def forward(self, x, cos, sin, start_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Pre-norm LLaMA decoder. Input is token ids or embeddings (images enter as embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Fill a model built on the meta device (after `to_empty`) with a fresh init."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif hasattr(m, "init_weights") and m is not self:
                m.init_weights(std)

    def setup_cache(self, batch: int, max_len: int | None = None, dtype=None):
        """Give every layer a KV cache; `clear_cache` removes them (training must not carry one)."""
        w = self.tok_embeddings.weight
        max_len = max_len or self.cfg.max_seq_len
        for layer in self.layers:
            a = layer.attention
            a.cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim, dtype or w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def forward(self, tokens=None, *, embeds=None, targets=None, start_pos: int = 0,
                last_only: bool = False):
        """tokens (B, T) or embeds (B, T, dim). targets (B, T): the next token at each
        position, IGNORE_INDEX where no loss is wanted. Returns (logits, loss)."""
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens or embeds")
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        T = h.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        positions = torch.arange(start_pos, start_pos + T, device=h.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        logits = self.output(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


def build(cfg: ModelConfig, device="cpu", dtype=torch.float32, init: bool = True) -> Transformer:
    """Build on the meta device (no memory, no init), then materialise weights once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if init:
        model.to_empty(device=device).to(dtype)
        if cfg.tie_embeddings:   # to_empty unties shared parameters
            model.output.weight = model.tok_embeddings.weight
        model.init_weights()
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() yields a tied weight once


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names every offending tensor."""


# HF name -> our name. Mixtral experts map to a slot of our stacked expert tensors.
_LLAMA_RULES = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.block_sparse_moe.gate.weight", "layers.{i}.feed_forward.gate.weight"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "layers.{i}.feed_forward.w1"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "layers.{i}.feed_forward.w3"),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "layers.{i}.feed_forward.w2"),
]
_INTERNLM2_RULES = [
    ("model.tok_embeddings.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("output.weight", "output.weight"),
    ("model.layers.{i}.attention.wqkv.weight", "layers.{i}.attention.wqkv"),   # unpacked below
    ("model.layers.{i}.attention.wo.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.feed_forward.w1.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.feed_forward.w2.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.feed_forward.w3.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.attention_norm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.ffn_norm.weight", "layers.{i}.ffn_norm.weight"),
]


def _compile_rules(rules):
    import re
    out = []
    for src, dst in rules:
        pat = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        out.append((re.compile(pat + "$"), dst))
    return out


def _map_name(name: str, rules) -> tuple[str, int | None] | None:
    """Our (name, expert slot or None) for a checkpoint name, or None if it is not ours."""
    for pat, dst in rules:
        m = pat.match(name)
        if m:
            g = m.groupdict()
            return dst.replace("{i}", g.get("i") or ""), (int(g["e"]) if g.get("e") else None)
    return None


def unpack_internlm2_wqkv(wqkv: torch.Tensor, cfg: ModelConfig):
    """InternLM2 packs q, k, v per kv group: rows are [n_kv, (q_per_kv + 2), head_dim].

    Within group g: the q heads g*q_per_kv .. (g+1)*q_per_kv - 1, then k head g, then v head g.
    """
    q_per_kv, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    w = wqkv.view(cfg.n_kv_heads, q_per_kv + 2, hd, cfg.dim)
    return (w[:, :q_per_kv].reshape(-1, cfg.dim), w[:, -2].reshape(-1, cfg.dim), w[:, -1].reshape(-1, cfg.dim))


def config_from_hf(hf: dict) -> tuple[ModelConfig, str]:
    """Our config and layout ("llama" | "internlm2") from a HF config.json."""
    arch = (hf.get("architectures") or [hf.get("model_type", "")])[0].lower()
    layout = "internlm2" if "internlm2" in arch else "llama"
    if not any(k in arch for k in ("llama", "internlm2", "mistral", "mixtral")):
        raise CheckpointError(f"unsupported architecture {arch!r}: expected Llama, InternLM2, Mistral or Mixtral")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"rope scaling {rope} is not supported")
    cfg = ModelConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_experts=hf.get("num_local_experts", 0), top_k=hf.get("num_experts_per_tok", 2))
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"head_dim {hf['head_dim']} != hidden_size / heads ({cfg.head_dim}) is not supported")
    if hf.get("attention_bias") or hf.get("bias"):
        raise CheckpointError("attention biases are not supported")
    return cfg, layout


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(files):
    """(name, tensor) pairs, one tensor in memory at a time."""
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def _tied_names(model: nn.Module) -> set[str]:
    """Second and later names of shared parameters (the output head of a tied model)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def load_state_strict(model: nn.Module, named_tensors, rename=None, expand=None, dtype=torch.float32,
                      device="cpu", where: str = "checkpoint", strict: bool = True):
    """Load (name, tensor) pairs into a model built on the meta device, checking every key and shape.

    rename(name) -> (our name, expert slot | None) or None for an unknown tensor; expand(our_name,
    tensor) -> [(name, tensor), ...] for packed tensors. All problems are collected and raised at
    once in a CheckpointError that names each tensor. Tied weights are expected once.
    """
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    tied = _tied_names(model)
    for n in tied:
        expected.pop(n, None)
    state, unexpected, misshaped, seen_slots, ties = {}, [], [], {}, []
    for src, t in named_tensors:
        target = rename(src) if rename else (src, None)
        if target is None or (target[0] in tied and target[1] is None):
            if target is None and not src.endswith("rotary_emb.inv_freq"):   # old HF files carry this buffer
                unexpected.append(src)
            continue
        name, slot = target
        pieces = expand(name, t) if expand else [(name, t)]
        for name, t in pieces:
            if name not in expected:
                unexpected.append(src)
                continue
            shape = expected[name]
            want = shape[1:] if slot is not None else shape
            if slot is not None and not 0 <= slot < shape[0]:
                misshaped.append(f"{src}: expert {slot} but the model has {shape[0]}")
            elif tuple(t.shape) != tuple(want):
                misshaped.append(f"{src}: checkpoint {tuple(t.shape)} vs model {tuple(want)}")
            elif slot is None:
                state[name] = t.to(device=device, dtype=dtype)
            else:
                if name not in state:
                    state[name] = torch.empty(shape, dtype=dtype, device=device)
                state[name][slot] = t
                seen_slots.setdefault(name, set()).add(slot)
    for name, slots in seen_slots.items():
        if len(slots) != expected[name][0]:
            missing_slots = sorted(set(range(expected[name][0])) - slots)
            misshaped.append(f"{name}: experts {missing_slots} missing")
    missing = sorted(set(expected) - set(state)) if strict else []
    if missing or unexpected or misshaped:
        parts = [f"{where} does not fit the model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(f"  {label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))
    first = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
        if n in tied:
            ties.append((n, first[id(p)]))
            state[n] = state.get(first[id(p)])
    model.load_state_dict(state, strict=strict, assign=True)
    for n, src in ties:       # assign=True gives each name its own Parameter: share them again
        owner, _, attr = n.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(src))
    return model


def load_hf(path, device="cpu", dtype=torch.float32) -> Transformer:
    """A HF-format directory: config.json + model.safetensors (or sharded with an index)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json (expected a HF-format model directory)")
    cfg, layout = config_from_hf(json.loads((path / "config.json").read_text()))
    rules = _compile_rules(_INTERNLM2_RULES if layout == "internlm2" else _LLAMA_RULES)

    def expand(name, t):
        if name.endswith(".wqkv"):
            if t.shape != ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim):
                return [(name + ".weight", t)]        # reported as unexpected, by its source name
            base = name[: -len("wqkv")]
            return list(zip((base + "wq.weight", base + "wk.weight", base + "wv.weight"),
                            unpack_internlm2_wqkv(t, cfg)))
        return [(name, t)]

    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_strict(model, iter_safetensors(_safetensors_files(path)), lambda n: _map_name(n, rules),
                      expand, dtype, device, where=str(path))
    return model


def save_safetensors_atomic(path, tensors: dict, metadata: dict):
    """Write to a temp file beside `path`, fsync, then rename: a crash keeps the previous file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_safetensors_metadata(path) -> dict:
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def unique_state_dict(model: nn.Module) -> dict:
    """state_dict without the second name of a tied weight (safetensors refuses shared storage)."""
    tied = _tied_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def save_llm(path, model: Transformer):
    """Our format: one safetensors file, the config as JSON in its metadata (one atomic write)."""
    save_safetensors_atomic(path, unique_state_dict(model),
                            {"format": "sphinx-x-llm", "config": json.dumps(asdict(model.cfg))})


def config_from_json(text: str, cls=ModelConfig):
    d = json.loads(text)
    known = {f.name for f in fields(cls)}
    if set(d) - known:
        raise CheckpointError(f"unknown config fields {sorted(set(d) - known)}")
    return cls(**d)


def load_llm(path, device="cpu", dtype=torch.float32) -> Transformer:
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sphinx-x-llm":
        raise CheckpointError(f"{path}: not a sphinx-x LLM checkpoint (format {meta.get('format')!r})")
    with torch.device("meta"):
        model = Transformer(config_from_json(meta["config"]))
    load_state_strict(model, iter_safetensors([path]), dtype=dtype, device=device, where=str(path))
    return model
