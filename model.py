"""SPHINX-X: the LLaMA-family decoder and the Sphinx model around it.

Read top to bottom: config and named sizes, the decoder pieces in the order data flows through them
(RMSNorm -> RoPE -> attention with a KV cache -> SwiGLU or MoE FFN -> block -> Transformer), then
`Sphinx` (paper Sec. 3.1: Mixture of Visual experts -> projector -> [BOS][image block][text], with
image tags and a skip token per fully padded sub-image) and its sizes. Loading and saving (HF layouts,
our checkpoints, the tiny base, the paper's pretrained parts) are in loading.py, generation in generate.py.
Parameter names follow the LLaMA2-Accessory reference code (wq/wk/wv/wo, w1/w2/w3)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoint import retie, tie_pairs
from data import IGNORE_INDEX      # the targets' "no loss here" label (image, prompt and padding positions)
from moe import ExpertPathChooser, MoEFeedForward
from parallel import copy_to_tp, cross_entropy_sum, reduce_from_tp, vocab_parallel_embedding
from tiling import ImageLayout, Tiles
from vision import CONVNEXT_CONFIGS, VIT_CONFIGS, ConvNeXtConfig, MixtureOfVisualExperts, ViTConfig


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
    rope_dynamic_factor: float = 0.0   # >0: dynamic NTK RoPE past rope_original_max (InternLM2's rope_scaling)
    rope_original_max: int = 0
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


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}      # the --dtype choices of train.py and sample.py


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512-BF16 or AMX), as torch itself reports."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def pick_dtype(choice: str, device="cpu", decode_dim: int | None = None, has_bf16=cpu_has_bf16) -> tuple[str, str]:
    """--dtype auto|bf16|fp32 -> (bf16 or fp32, why), from the device and the CPU's instructions alone, so a
    run's choice never depends on how busy the machine is. auto: bf16 on a CUDA GPU and on Apple GPUs from
    macOS 14 (where torch has bf16 there); on a CPU, bf16 where it has bf16 instructions (measured on an
    AVX-512-BF16 EPYC: bf16 matmuls ~4x fp32; AVX2-only CPUs run bf16 ~100x slower). Decoding
    (decode_dim = the LLM width) is matrix-vector products: bf16 pays only from d ~1024 (measured at d=256:
    ~2x slower than fp32, at d=1024: ~1.8x faster). Master weights, norms, router softmax and loss stay fp32."""
    if choice != "auto":
        return choice, "as asked"
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16", "a GPU"
    if kind == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0):
            return "bf16", "an Apple GPU on macOS >= 14"
        return "fp32", "an Apple GPU before macOS 14 (no bf16 there)"
    if not has_bf16():
        return "fp32", "this CPU has no bf16 matmul instructions (AVX-512-BF16 or AMX)"
    if decode_dim is not None and decode_dim < 1024:
        return "fp32", f"decoding at d={decode_dim}: bf16 matrix-vector products are slower there"
    return "bf16", "this CPU has bf16 matmul instructions"


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
    # Experts as wide as tiny's FFN: each starts as a copy of it (sparse upcycling from the tiny base).
    "tiny-moe": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, ffn_dim=688,
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
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables for rotary embeddings at the given absolute positions.

    Computed per forward instead of stored as buffers: a model built on the meta
    device then needs no buffer re-initialisation, and the cost is one tiny outer product.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    # The half-split ("rotate_half") layout of HF weights; sin carries rotate_half's sign.
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def rope_theta_at(cfg: "ModelConfig", end: int) -> float:
    """The RoPE base for a forward whose last position is end - 1. Dynamic NTK scaling (as transformers'
    "dynamic" rope_type) raises the base once the sequence passes the trained length; below it nothing changes."""
    if not cfg.rope_dynamic_factor or end <= cfg.rope_original_max:
        return cfg.rope_theta
    f, hd = cfg.rope_dynamic_factor, cfg.head_dim
    return cfg.rope_theta * (f * end / cfg.rope_original_max - (f - 1)) ** (hd / (hd - 2))


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd). Pairs are (i, i + hd/2), the layout HF-format Llama/InternLM2 checkpoints use.
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)


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
        # Under tensor parallelism (train.py) each rank holds n_heads/tp query heads and n_kv_heads/tp
        # kv heads (Transformer checks divisibility); wq/wk/wv are column-split and wo row-split.
        self.n_heads = cfg.n_heads // tp_size
        self.n_kv_heads = cfg.n_kv_heads // tp_size
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
    """Pre-norm block. Under TP, attention and FFN return partial sums: f before, g after (Megatron)."""

    def __init__(self, cfg: ModelConfig, tp_size: int = 1, chooser: ExpertPathChooser | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, tp_size)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.n_experts:
            self.feed_forward = MoEFeedForward(cfg.dim, cfg.ffn_dim // tp_size, cfg.n_experts, cfg.top_k,
                                               chooser)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim // tp_size)

    def forward(self, x, cos, sin, start_pos=0, tp_group=None):
        h = self.attention(copy_to_tp(self.attention_norm(x), tp_group), cos, sin, start_pos)
        x = x + reduce_from_tp(h, tp_group)
        return x + reduce_from_tp(self.feed_forward(copy_to_tp(self.ffn_norm(x), tp_group)), tp_group)


class Transformer(nn.Module):
    """Pre-norm LLaMA decoder. Input is token ids or embeddings (images enter as embeddings)."""

    def __init__(self, cfg: ModelConfig, tp_group=None):
        super().__init__()
        self.cfg, self.tp_group = cfg, tp_group
        tp = 1 if tp_group is None else tp_group.size()
        if cfg.vocab_size % tp or cfg.n_heads % tp or cfg.ffn_dim % tp or cfg.n_kv_heads % tp:
            raise ValueError(f"TP {tp} must divide vocab {cfg.vocab_size}, heads {cfg.n_heads}, "
                             f"kv heads {cfg.n_kv_heads} and ffn {cfg.ffn_dim}")
        # Under TP: vocab rows, heads and FFN hidden units are split over the ranks.
        # _weight given: no init here (init_weights does it on real storage); normal_ on the meta
        # device would import torch._dynamo, ~1.5 s of every start-up.
        self.tok_embeddings = nn.Embedding(cfg.vocab_size // tp, cfg.dim, _weight=torch.empty(cfg.vocab_size // tp, cfg.dim))
        chooser = ExpertPathChooser() if cfg.n_experts else None     # MoE: one timing per shape for all layers
        self.layers = nn.ModuleList(Block(cfg, tp, chooser) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size // tp, bias=False)
        self.activation_checkpointing = False
        self.rope_table = None             # (cos, sin) for every cached position, set by setup_cache
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
        # Decoding runs one token per forward: tabulate RoPE once instead of per step.
        self.rope_table = rope_cos_sin(torch.arange(max_len, device=w.device), self.cfg.head_dim, self.cfg.rope_theta)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None
        self.rope_table = None

    def decode_step(self, token, pos: int):
        """Logits for one new token (B, 1) at absolute position pos, against the KV cache."""
        return self(token, start_pos=pos)[0]

    def embed_tokens(self, tokens):
        return vocab_parallel_embedding(tokens, self.tok_embeddings.weight, self.tp_group)

    def forward(self, tokens=None, *, embeds=None, targets=None, start_pos: int = 0,
                last_only: bool = False, loss_sum: bool = False, loss_only: bool = False):
        """tokens (B, T) or embeds (B, T, dim). targets (B, T): the next token at each
        position, IGNORE_INDEX where no loss is wanted. Returns (logits, loss): the mean loss over
        targets, or their sum if loss_sum. Under TP the logits are this rank's vocab shard.
        loss_only: logits only at the targets' positions (training: image and prompt positions predict
        nothing, so their vocabulary projection is skipped, as the reference skips the image block);
        returns (None, loss)."""
        if (tokens is None) == (embeds is None):
            raise ValueError("pass exactly one of tokens or embeds")
        h = self.embed_tokens(tokens) if embeds is None else embeds
        T = h.shape[1]
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        theta = rope_theta_at(self.cfg, start_pos + T)
        if self.rope_table is not None and start_pos + T <= len(self.rope_table[0]) and theta == self.cfg.rope_theta:
            cos, sin = (t[start_pos:start_pos + T] for t in self.rope_table)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=h.device)
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, theta)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                # Recompute each block in backward: activation memory of one block instead of all.
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, start_pos, self.tp_group, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, self.tp_group)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        if loss_only and targets is not None:
            keep = targets != IGNORE_INDEX
            h, targets = h[keep][None], targets[keep][None]
        logits = self.output(copy_to_tp(h, self.tp_group))
        loss = None
        if targets is not None:
            loss = cross_entropy_sum(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX, self.tp_group)
            if not loss_sum:
                loss = loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return (None if loss_only else logits), loss


def materialise(model: nn.Module, device, dtype):
    """Give a meta-device model real storage and a fresh init, once (to_empty unties shared weights)."""
    ties = tie_pairs(model)
    model.to_empty(device=device).to(dtype)
    retie(model, ties)
    model.init_weights()
    return model


def build(cfg: ModelConfig, device="cpu", dtype=torch.float32, init: bool = True) -> Transformer:
    """Build on the meta device (no memory, no init), then materialise weights once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return materialise(model, device, dtype) if init else model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() yields a tied weight once


# ----------------------------------------------------------------------------- SPHINX-X

@dataclass(frozen=True)
class SphinxConfig:
    llm: ModelConfig
    convnext: ConvNeXtConfig
    vit: ViTConfig
    canvas: int = 448            # 448 -> 2x2 sub-images of 224; 672 -> 3x3 (SPHINX-Plus-2K)
    grid: int = 2
    skip_tokens: bool = True     # False: every sub-image is encoded (ablations, reference checkpoints)

    @property
    def view_size(self) -> int:
        return self.canvas // self.grid


def _sphinx(llm: str, canvas=448, grid=2, vision="paper", **llm_overrides) -> SphinxConfig:
    cn, vt = ("convnext-xxlarge", "dinov2-vitg14") if vision == "paper" else (vision, vision)
    return SphinxConfig(llm_config(llm, **llm_overrides), CONVNEXT_CONFIGS[cn], VIT_CONFIGS[vt], canvas, grid)


SIZES = {
    "sphinx-tiny": lambda: _sphinx("tinyllama-1.1b"),
    "sphinx-intern2": lambda: _sphinx("internlm2-7b"),
    "sphinx-plus": lambda: _sphinx("llama2-13b"),
    "sphinx-plus-2k": lambda: _sphinx("llama2-13b", canvas=672, grid=3),
    "sphinx-moe": lambda: _sphinx("mixtral-8x7b"),
    "tiny": lambda: _sphinx("tiny", canvas=128, grid=2, vision="tiny"),
    "tiny-moe": lambda: _sphinx("tiny-moe", canvas=128, grid=2, vision="tiny"),
}


def sphinx_config(name: str, **overrides) -> SphinxConfig:
    if name not in SIZES:
        raise KeyError(f"unknown size {name!r}; known: {', '.join(SIZES)}")
    return replace(SIZES[name](), **overrides)


class Sphinx(nn.Module):
    """MoV + projector + image tags + skip token + the LLM.

    Sequence: [BOS] [image block] [text], the image block being, per view,
    <img> tokens </img> (begin/end-of-image are learnable vectors), or one learnable
    skip token for a fully padded sub-image, which is never encoded (paper Sec. 3.1).
    """

    def __init__(self, cfg: SphinxConfig, tp_group=None, mov: MixtureOfVisualExperts | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.llm.dim
        # The one seam for another image path (formats/released_vision.py's ReleasedMoV): it brings its
        # own layout (how a photo becomes views) and encode_images; everything else is shared.
        self.mov = mov or MixtureOfVisualExperts(cfg.convnext, cfg.vit, d)
        self.begin_of_image = nn.Parameter(torch.zeros(d))
        self.end_of_image = nn.Parameter(torch.zeros(d))
        self.skip_token = nn.Parameter(torch.zeros(d))
        self.llm = Transformer(cfg.llm, tp_group)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        self.llm.init_weights(std)
        self.mov.init_weights(std)
        for p in (self.begin_of_image, self.end_of_image, self.skip_token):
            nn.init.normal_(p, std=std)

    @property
    def layout(self) -> ImageLayout:
        return self.mov.layout(self.cfg.canvas, self.cfg.grid, self.cfg.skip_tokens)

    def image_cost(self, tiles: Tiles) -> dict:
        """What one image costs: views through the encoders, skip tokens, LLM positions."""
        layout = self.layout
        enc = layout.encoded(tiles.fully_padded)
        return {"views_encoded": sum(enc), "skip_tokens": len(enc) - sum(enc),
                "image_tokens": layout.block_len(tiles.fully_padded)}

    def image_blocks(self, images: list[Tiles | None]) -> list[torch.Tensor | None]:
        """(L_i, d) image block per sample; all encoded views of the batch go through MoV at once."""
        layout = self.layout
        encoded = [None if t is None else layout.encoded(t.fully_padded) for t in images]
        present = [(t, e) for t, e in zip(images, encoded) if t is not None]
        feats = self.mov.encode_images([t for t, _ in present], [e for _, e in present], self.llm.tp_group)
        blocks, k = [], 0
        for enc in encoded:
            if enc is None:
                blocks.append(None)
                continue
            parts = []
            for e in enc:
                if e:
                    parts += [self.begin_of_image[None], feats[k], self.end_of_image[None]]
                    k += 1
                else:
                    parts.append(self.skip_token[None])
            blocks.append(torch.cat(parts))
        return blocks

    def embed(self, tokens, images=None, targets=None):
        """tokens (B, T): right-padded text starting with BOS. The image block goes right after BOS;
        its positions get IGNORE_INDEX targets. Returns embeds (B, T', d) and targets (B, T')."""
        text = self.llm.embed_tokens(tokens)
        if images is None or all(t is None for t in images):
            return text, targets
        blocks = self.image_blocks(images)
        seqs, tgts = [], []
        for b, block in enumerate(blocks):
            parts = [text[b, :1]] + ([block] if block is not None else []) + [text[b, 1:]]
            seqs.append(torch.cat(parts))
            if targets is not None:
                n = 0 if block is None else len(block)
                # BOS and the image positions predict nothing; the last image position takes BOS's target.
                tgts.append(torch.cat([targets.new_full((n,), IGNORE_INDEX), targets[b]]))
        T = max(len(s) for s in seqs)
        embeds = torch.stack([F.pad(s, (0, 0, 0, T - len(s))) for s in seqs])
        if targets is not None:
            targets = torch.stack([F.pad(t, (0, T - len(t)), value=IGNORE_INDEX) for t in tgts])
        return embeds, targets

    def forward(self, tokens, images=None, targets=None, start_pos: int = 0, last_only: bool = False,
                loss_sum: bool = False, loss_only: bool = False):
        embeds, targets = self.embed(tokens, images, targets)
        return self.llm(embeds=embeds, targets=targets, start_pos=start_pos, last_only=last_only, loss_sum=loss_sum,
                        loss_only=loss_only)


def build_sphinx(cfg: SphinxConfig, device="cpu", dtype=torch.float32, init: bool = True, tp_group=None,
                 mov=None) -> Sphinx:
    """mov: a callable that builds another image path's MoV (on the meta device, as the rest)."""
    with torch.device("meta"):
        model = Sphinx(cfg, tp_group, mov() if mov else None)
    if init:
        materialise(model, device, dtype)
    model.mov.freeze_encoders()
    return model
