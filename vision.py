"""The Mixture of Visual experts (MoV, paper Sec. 3.1): CLIP-ConvNeXt + DINOv2 -> projector.

Read top to bottom: configs, ConvNeXt, the DINOv2-style ViT, checkpoint key layouts
(HF transformers, timm/open_clip, original DINOv2), then `MixtureOfVisualExperts`,
which runs both frozen encoders on every view, aligns their token grids, concatenates
channels and projects them to the LLM width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from checkpoint import CheckpointError, compile_rules, iter_safetensors, load_state_strict, map_name, safetensors_files
from parallel import split_rows_and_gather

# CLIP normalisation for ConvNeXt (open_clip laion2b), ImageNet statistics for DINOv2, as each was trained.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple = (3, 4, 30, 3)
    dims: tuple = (384, 768, 1536, 3072)
    input_size: int | None = 512     # views are resized to this first: 512 / 32 = a 16x16 map (None: as given)
    eps: float = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    dim: int = 1536
    depth: int = 40
    heads: int = 24
    patch: int = 14
    pos_grid: int = 37                # learned position grid (518 / 14), interpolated to the input grid
    ffn: str = "swiglu"               # "swiglu" (ViT-g) or "mlp"
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    # How the position grid is resized: "size" (to the exact grid, as transformers) or "dinov2" (the
    # original code: a scale factor of (grid + 0.1) / pos_grid, which samples slightly differently).
    pos_interp: str = "size"
    # DINOv2 (the defaults) vs CLIP's ViT: CLIP has no layer scale, no bias on the patch projection, a
    # LayerNorm before the blocks (ln_pre), QuickGELU, and no mask token.
    act: str = "gelu"
    layer_scale: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    mask_token: bool = True
    mlp_hidden: int = 0               # the MLP's width when it is not dim * mlp_ratio (BLIP-2's EVA ViT-g: 6144)

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        h = int(self.dim * self.mlp_ratio)
        return (int(h * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else h   # DINOv2's SwiGLU width


# The paper's encoders compute as their original code: timm's ConvNeXt-XXL (LayerNorm eps 1e-5, open_clip's
# convnext_xxlarge) and torch.hub's DINOv2 (its own position interpolation).
CONVNEXT_CONFIGS = {"convnext-xxlarge": ConvNeXtConfig(eps=1e-5),
                    "tiny": ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), input_size=128)}
# The original SPHINX's CLIP ViT-L/14 (OpenAI weights; SPHINX-MoE-1k keeps it): 224 px -> 16x16 + cls.
CLIP_VIT = dict(ffn="mlp", act="quick_gelu", layer_scale=False, patch_bias=False, pre_norm=True, mask_token=False)
VIT_CONFIGS = {"dinov2-vitg14": ViTConfig(pos_interp="dinov2"),
               "clip-vitl14": ViTConfig(dim=1024, depth=24, heads=16, patch=14, pos_grid=16, eps=1e-5, **CLIP_VIT),
               "tiny": ViTConfig(dim=128, depth=2, heads=4, patch=16, pos_grid=4, ffn="mlp")}


# ----------------------------------------------------------------------------- ConvNeXt

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))     # layer scale

    def forward(self, x):
        h = self.conv_dw(x).permute(0, 2, 3, 1)                  # NHWC: LayerNorm and MLP act on channels
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Stem (4x4 patchify + LN), 4 stages with 2x2 downsampling between, head LayerNorm on the map."""

    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.dims[0], 4, stride=4), LayerNorm2d(cfg.dims[0], eps=cfg.eps))
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            stage = nn.Module()
            stage.downsample = (nn.Sequential(LayerNorm2d(cfg.dims[i - 1], eps=cfg.eps),
                                              nn.Conv2d(cfg.dims[i - 1], dim, 2, stride=2)) if i else nn.Identity())
            stage.blocks = nn.Sequential(*(ConvNeXtBlock(dim, cfg.eps) for _ in range(depth)))
            self.stages.append(stage)
        self.head_norm = LayerNorm2d(cfg.dims[-1], eps=cfg.eps)

    def forward_features(self, x):
        """The stride-32 map before the head norm: (B, C, H/32, W/32)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return x

    def forward(self, x):
        return self.head_norm(self.forward_features(x))


# ----------------------------------------------------------------------------- DINOv2 (and CLIP) ViT

def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)          # OpenAI CLIP's GELU approximation, which its weights expect


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.swiglu = cfg.ffn == "swiglu"
        # SwiGLU: fc1 computes [gate | up] in one matmul (DINOv2's w12), fc2 is w3.
        self.fc1 = nn.Linear(cfg.dim, (2 if self.swiglu else 1) * cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)
        self.ls2 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        a = self.proj(a)
        x = x + (a if self.ls1 is None else self.ls1 * a)
        h = self.fc1(self.norm2(x))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        h = self.fc2(h)
        return x + (h if self.ls2 is None else self.ls2 * h)


class ViT(nn.Module):
    """DINOv2: patch embedding, cls token, bicubically interpolated learned positions, blocks, final norm.
    With CLIP's settings (CLIP_VIT), OpenAI's CLIP ViT: the same with ln_pre, QuickGELU, no layer scale;
    its final norm (ln_post) applies to every token, as the reference's clip_encode_image does."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, cfg.dim))
        # stands in for masked patches (pretrain.py's masked-image objective; DINOv2 checkpoints carry it)
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim)) if cfg.mask_token else None
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def positions(self, gh: int, gw: int):
        g = self.cfg.pos_grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        if self.cfg.pos_interp == "dinov2":
            grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g, (gw + 0.1) / g), mode="bicubic", align_corners=False)
        else:
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x, mask=None):
        """(B, 3, H, W) -> final-norm tokens (B, 1 + H/p * W/p, dim), cls first. mask (B, H/p * W/p),
        True where a patch is hidden: its embedding is replaced by mask_token (DINOv2/iBOT masking)."""
        gh, gw = x.shape[2] // self.cfg.patch, x.shape[3] // self.cfg.patch
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.positions(gh, gw)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- checkpoint layouts

# (source name, our name). Prefixes such as `visual.trunk.` (open_clip) are stripped first.
CONVNEXT_LAYOUTS = {
    "hf": [("embeddings.patch_embeddings.{p}", "stem.0.{p}"), ("embeddings.layernorm.{p}", "stem.1.{p}"),
           ("encoder.stages.{i}.downsampling_layer.{k}.{p}", "stages.{i}.downsample.{k}.{p}"),
           ("encoder.stages.{i}.layers.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
           ("encoder.stages.{i}.layers.{j}.layernorm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
           ("encoder.stages.{i}.layers.{j}.pwconv1.{p}", "stages.{i}.blocks.{j}.fc1.{p}"),
           ("encoder.stages.{i}.layers.{j}.pwconv2.{p}", "stages.{i}.blocks.{j}.fc2.{p}"),
           ("encoder.stages.{i}.layers.{j}.layer_scale_parameter", "stages.{i}.blocks.{j}.gamma"),
           ("layernorm.{p}", "head_norm.{p}")],
    "timm": [("stem.{k}.{p}", "stem.{k}.{p}"), ("stages.{i}.downsample.{k}.{p}", "stages.{i}.downsample.{k}.{p}"),
             ("stages.{i}.blocks.{j}.conv_dw.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
             ("stages.{i}.blocks.{j}.norm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
             ("stages.{i}.blocks.{j}.mlp.fc1.{p}", "stages.{i}.blocks.{j}.fc1.{p}"),
             ("stages.{i}.blocks.{j}.mlp.fc2.{p}", "stages.{i}.blocks.{j}.fc2.{p}"),
             ("stages.{i}.blocks.{j}.gamma", "stages.{i}.blocks.{j}.gamma"), ("head.norm.{p}", "head_norm.{p}")],
}
VIT_LAYOUTS = {
    "hf": [("embeddings.patch_embeddings.projection.{p}", "patch_embed.{p}"), ("embeddings.cls_token", "cls_token"),
           ("embeddings.position_embeddings", "pos_embed"), ("embeddings.mask_token", "mask_token"),
           ("encoder.layer.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
           ("encoder.layer.{i}.attention.qkv.{p}", "blocks.{i}.qkv.{p}"),     # merged from query/key/value
           ("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.proj.{p}"),
           ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1"),
           ("encoder.layer.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
           ("encoder.layer.{i}.mlp.fc1.{p}", "blocks.{i}.fc1.{p}"), ("encoder.layer.{i}.mlp.fc2.{p}", "blocks.{i}.fc2.{p}"),
           ("encoder.layer.{i}.mlp.weights_in.{p}", "blocks.{i}.fc1.{p}"),
           ("encoder.layer.{i}.mlp.weights_out.{p}", "blocks.{i}.fc2.{p}"),
           ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2"), ("layernorm.{p}", "norm.{p}")],
    "dinov2": [("patch_embed.proj.{p}", "patch_embed.{p}"), ("cls_token", "cls_token"), ("pos_embed", "pos_embed"),
               ("mask_token", "mask_token"), ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
               ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.qkv.{p}"), ("blocks.{i}.attn.proj.{p}", "blocks.{i}.proj.{p}"),
               ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1"), ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
               ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.fc1.{p}"), ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.fc2.{p}"),
               ("blocks.{i}.mlp.w12.{p}", "blocks.{i}.fc1.{p}"), ("blocks.{i}.mlp.w3.{p}", "blocks.{i}.fc2.{p}"),
               ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2"), ("norm.{p}", "norm.{p}")],
}
# CLIP's ViT: OpenAI / open_clip (the reference holds it as clip.visual.*) and transformers' CLIPVisionModel.
CLIP_LAYOUTS = {
    "openai": [("conv1.weight", "patch_embed.weight"), ("class_embedding", "cls_token"),
               ("positional_embedding", "pos_embed"), ("ln_pre.{p}", "norm_pre.{p}"),
               ("transformer.resblocks.{i}.ln_1.{p}", "blocks.{i}.norm1.{p}"),
               ("transformer.resblocks.{i}.attn.in_proj_weight", "blocks.{i}.qkv.weight"),
               ("transformer.resblocks.{i}.attn.in_proj_bias", "blocks.{i}.qkv.bias"),
               ("transformer.resblocks.{i}.attn.out_proj.{p}", "blocks.{i}.proj.{p}"),
               ("transformer.resblocks.{i}.ln_2.{p}", "blocks.{i}.norm2.{p}"),
               ("transformer.resblocks.{i}.mlp.c_fc.{p}", "blocks.{i}.fc1.{p}"),
               ("transformer.resblocks.{i}.mlp.c_proj.{p}", "blocks.{i}.fc2.{p}"), ("ln_post.{p}", "norm.{p}")],
    "hf": [("embeddings.patch_embedding.weight", "patch_embed.weight"), ("embeddings.class_embedding", "cls_token"),
           ("embeddings.position_embedding.weight", "pos_embed"), ("pre_layrnorm.{p}", "norm_pre.{p}"),
           ("encoder.layers.{i}.layer_norm1.{p}", "blocks.{i}.norm1.{p}"),
           ("encoder.layers.{i}.self_attn.qkv.{p}", "blocks.{i}.qkv.{p}"),     # merged from q/k/v_proj
           ("encoder.layers.{i}.self_attn.out_proj.{p}", "blocks.{i}.proj.{p}"),
           ("encoder.layers.{i}.layer_norm2.{p}", "blocks.{i}.norm2.{p}"),
           ("encoder.layers.{i}.mlp.fc1.{p}", "blocks.{i}.fc1.{p}"), ("encoder.layers.{i}.mlp.fc2.{p}", "blocks.{i}.fc2.{p}"),
           ("post_layernorm.{p}", "norm.{p}")],
}
# CLIP's projection into the joint text-image space: SPHINX reads the tokens before it, so it is not loaded.
CLIP_UNUSED = ("proj", "visual_projection.weight")
_PREFIXES = ("clip.visual.", "visual.trunk.", "trunk.", "visual.", "vision_model.", "model.")


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _merge_hf_qkv(named, tag=".attention.attention.{}.", merged=".attention.qkv.", which=("query", "key", "value")):
    """transformers stores query/key/value separately (Dinov2: attention.attention.query; CLIP:
    self_attn.q_proj); DINOv2, OpenAI CLIP and we use one qkv (rows q, k, v)."""
    parts = {}
    for name, t in named:
        for w in which:
            if tag.format(w) in name:
                base, p = name.split(tag.format(w))
                got = parts.setdefault((base, p), {})
                got[w] = t
                if len(got) == 3:
                    yield f"{base}{merged}{p}", torch.cat([got[x] for x in which])
                    del parts[(base, p)]
                break
        else:
            yield name, t
    for (base, p), got in parts.items():     # an incomplete triple: report what is there as unexpected
        for w, t in got.items():
            yield f"{base}{tag.format(w)}{p}", t


def with_batch_dim(name: str, t: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP keeps its cls token (d,) and positions (T, d) without the batch dim ours have."""
    return t.reshape(1, -1, t.shape[-1]) if name in ("cls_token", "pos_embed") and t.dim() < 3 else t


def layout_rules(layout, reverse: bool = False):
    """Compiled renaming rules of a layout table, source -> ours (reverse: ours -> source).
    {p} stands for weight or bias; the other fields are integer indices."""
    pairs = [(d, s) if reverse else (s, d) for s, d in layout]
    return compile_rules([(a.replace("{p}", p), b.replace("{p}", p)) for a, b in pairs
                          for p in (("weight", "bias") if "{p}" in a else ("",))])


def load_encoder(module: nn.Module, path, dtype=torch.float32, device="cpu") -> nn.Module:
    """Load ConvNeXt or ViT weights from a safetensors file or HF directory, any known layout.

    `module` is built on the meta device; the layout is recognised from the key names.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such encoder checkpoint")
    files = safetensors_files(path) if path.is_dir() else [path]
    with safe_open(str(files[0]), framework="pt") as f:
        first = [_strip(k) for k in f.keys()]
    is_vit = isinstance(module, ViT)
    is_clip = is_vit and module.cfg.pre_norm
    layouts = CLIP_LAYOUTS if is_clip else VIT_LAYOUTS if is_vit else CONVNEXT_LAYOUTS
    if any(k.startswith(("embeddings.", "encoder.")) for k in first):
        layout = "hf"
    else:
        layout = "openai" if is_clip else "dinov2" if is_vit else "timm"
    rules = layout_rules(layouts[layout])

    def rename(name):
        return map_name(name, rules)

    reshape = lambda name, t: [(name, with_batch_dim(name, t))]

    named = ((n, t) for n, t in ((_strip(n), t) for n, t in iter_safetensors(files)) if not (is_clip and n in CLIP_UNUSED))
    if is_vit and layout == "hf":
        named = _merge_hf_qkv(named, *((".self_attn.{}_proj.", ".self_attn.qkv.", "qkv") if is_clip else ()))
    return load_state_strict(module, named, rename, reshape if is_vit else None, dtype=dtype, device=device,
                             where=f"{path} ({'clip-' if is_clip else ''}{layout} layout)")


# ----------------------------------------------------------------------------- BLIP-2 Q-Former

@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2's image side (the original SPHINX's fourth encoder): an EVA ViT-g (our ViT without layer scale
    or ln_pre, GELU) whose final-norm tokens 32 learned queries read through a 12-layer BERT-style
    Q-Former, cross-attending every other layer. Defaults: Salesforce/blip2-opt-2.7b, as the reference."""
    vision: ViTConfig = ViTConfig(dim=1408, depth=39, heads=16, patch=14, pos_grid=16, ffn="mlp", mlp_hidden=6144,
                                  layer_scale=False, mask_token=False)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    hidden: int = 3072
    queries: int = 32
    cross_every: int = 2
    eps: float = 1e-12


class QFormerAttention(nn.Module):
    """BERT attention with its post-norm residual: norm(dense(attend(x -> context)) + x)."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(context_dim, dim), nn.Linear(context_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, context=None):
        c = x if context is None else context
        split = lambda t: t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(c)), split(self.value(c)))
        return self.norm(self.dense(a.transpose(1, 2).flatten(2)) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        self.attn = QFormerAttention(cfg.dim, cfg.heads, cfg.dim, cfg.eps)
        self.cross = QFormerAttention(cfg.dim, cfg.heads, cfg.vision.dim, cfg.eps) if cross else None
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.hidden), nn.Linear(cfg.hidden, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, x, image):
        x = self.attn(x)
        if self.cross is not None:
            x = self.cross(x, image)
        return self.norm(self.fc2(F.gelu(self.fc1(x))) + x)


class QFormer(nn.Module):
    """views (N, 3, 224, 224), CLIP-normalised -> (N, queries, dim): what the reference's
    Blip2Model.get_qformer_features returns."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.queries, cfg.dim))
        self.norm_in = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_every == 0) for i in range(cfg.depth))

    def forward(self, views):
        image = self.vision(views)
        x = self.norm_in(self.query_tokens.expand(len(views), -1, -1))
        for layer in self.layers:
            x = layer(x, image)
        return x


# transformers' Blip2Model names (the reference holds them under qformer.*). Older transformers kept the
# vision attention's bias as q_bias and v_bias (no key bias); they are merged into qkv.bias when read.
QFORMER_LAYOUT = [
    ("query_tokens", "query_tokens"), ("vision_model.embeddings.class_embedding", "vision.cls_token"),
    ("vision_model.embeddings.patch_embedding.{p}", "vision.patch_embed.{p}"),
    ("vision_model.embeddings.position_embedding", "vision.pos_embed"),
    ("vision_model.encoder.layers.{i}.self_attn.qkv.{p}", "vision.blocks.{i}.qkv.{p}"),
    ("vision_model.encoder.layers.{i}.self_attn.projection.{p}", "vision.blocks.{i}.proj.{p}"),
    ("vision_model.encoder.layers.{i}.layer_norm1.{p}", "vision.blocks.{i}.norm1.{p}"),
    ("vision_model.encoder.layers.{i}.layer_norm2.{p}", "vision.blocks.{i}.norm2.{p}"),
    ("vision_model.encoder.layers.{i}.mlp.fc1.{p}", "vision.blocks.{i}.fc1.{p}"),
    ("vision_model.encoder.layers.{i}.mlp.fc2.{p}", "vision.blocks.{i}.fc2.{p}"),
    ("vision_model.post_layernorm.{p}", "vision.norm.{p}"), ("qformer.layernorm.{p}", "norm_in.{p}"),
    ("qformer.encoder.layer.{i}.intermediate_query.dense.{p}", "layers.{i}.fc1.{p}"),
    ("qformer.encoder.layer.{i}.output_query.dense.{p}", "layers.{i}.fc2.{p}"),
    ("qformer.encoder.layer.{i}.output_query.LayerNorm.{p}", "layers.{i}.norm.{p}"),
] + [(f"qformer.encoder.layer.{{i}}.{src}.{a}.{{p}}", f"layers.{{i}}.{dst}.{b}.{{p}}")
     for src, dst in (("attention", "attn"), ("crossattention", "cross"))
     for a, b in (("attention.query", "query"), ("attention.key", "key"), ("attention.value", "value"),
                  ("output.dense", "dense"), ("output.LayerNorm", "norm"))]
# The language side of a whole Blip2Model, and the Q-Former's text-only feed-forward: not used for images.
QFORMER_UNUSED = re.compile(r"^(language_model\.|language_projection\.|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.)")


def merge_q_v_bias(named):
    """Older Blip2 files: self_attn.q_bias and v_bias -> one qkv.bias with a zero key part."""
    held = {}
    for name, t in named:
        if name.endswith((".self_attn.q_bias", ".self_attn.v_bias")):
            base = name.rsplit(".", 1)[0]
            got = held.setdefault(base, {})
            got[name[-6]] = t                                   # "q" or "v"
            if len(got) == 2:
                del held[base]
                yield f"{base}.qkv.bias", torch.cat([got["q"], torch.zeros_like(got["q"]), got["v"]])
            continue
        yield name, t
    for base, got in held.items():             # one without the other: reported as unexpected
        for w, t in got.items():
            yield f"{base}.{w}_bias", t


def load_qformer(module: QFormer, path, dtype=torch.float32, device="cpu") -> QFormer:
    """BLIP-2 weights (a transformers Blip2Model directory or safetensors file; a `qformer.` prefix, as
    the reference holds them, is stripped) into a QFormer built on the meta device."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such Q-Former checkpoint")
    files = safetensors_files(path) if path.is_dir() else [path]
    rules = layout_rules(QFORMER_LAYOUT)
    with safe_open(str(files[0]), framework="pt") as f:
        nested = any(k.startswith("qformer.qformer.") or k.startswith("qformer.query_tokens") for k in f.keys())
    named = ((n.removeprefix("qformer.") if nested else n, t) for n, t in iter_safetensors(files))
    named = ((n, t) for n, t in merge_q_v_bias(named) if not QFORMER_UNUSED.match(n))
    return load_state_strict(module, named, lambda n: map_name(n, rules), dtype=dtype, device=device,
                             where=f"{path} (BLIP-2 layout)")


# ----------------------------------------------------------------------------- Mixture of Visual experts

def normalize(x, mean, std):
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class MixtureOfVisualExperts(nn.Module):
    """Both frozen encoders on every view; grids aligned; channels concatenated; Linear + LayerNorm.

    views (N, 3, S, S) in [0, 1] -> (N, 1 + (S/patch)^2, llm_dim). The ViT fixes the grid
    (16x16 for 224/14); the ConvNeXt map (16x16 when fed 512 px) is resized to it if needed,
    and its cls token is the mean of its grid (the reference's choice: ConvNeXt has no cls token).
    """

    def __init__(self, convnext: ConvNeXtConfig, vit: ViTConfig, llm_dim: int, clip: ViTConfig | None = None,
                 qformer: QFormerConfig | None = None):
        super().__init__()
        self.convnext = ConvNeXt(convnext)
        self.vit = ViT(vit)
        # SPHINX-MoE-1k's extra encoders (the original SPHINX's): CLIP channels go first in the concatenation,
        # the Q-Former's queries get their own projector and come first in each view's tokens.
        self.clip = ViT(clip) if clip else None
        self.qformer = QFormer(qformer) if qformer else None
        channels = convnext.dims[-1] + vit.dim + (clip.dim if clip else 0)
        self.proj = nn.Sequential(nn.Linear(channels, llm_dim), nn.LayerNorm(llm_dim))
        self.qformer_proj = nn.Sequential(nn.Linear(qformer.dim, llm_dim), nn.LayerNorm(llm_dim)) if qformer else None

    def tokens_per_view(self, view_size: int) -> int:
        return 1 + (view_size // self.vit.cfg.patch) ** 2 + (self.qformer.cfg.queries if self.qformer else 0)

    def encoders(self) -> list[nn.Module]:
        return [m for m in (self.convnext, self.vit, self.clip, self.qformer) if m is not None]

    def freeze_encoders(self):
        for enc in self.encoders():
            enc.requires_grad_(False).eval()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random init for CPU sizes; real encoders come from load_encoder."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std if isinstance(m, nn.Linear) else (1.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        vits = [m for m in self.modules() if isinstance(m, ViT)]
        for p in [p for v in vits for p in (v.cls_token, v.pos_embed, v.mask_token)] + \
                 ([self.qformer.query_tokens] if self.qformer else []):
            if p is not None:
                nn.init.normal_(p, std=std)
        for name, p in self.named_parameters():     # layer scales at 1: random blocks must contribute
            if name.endswith(("gamma", "ls1", "ls2")):
                nn.init.ones_(p)

    def vit_tokens(self, views, mask=None):
        """(N, 1 + g*g, vit dim): DINOv2 sees ImageNet-normalised views."""
        return self.vit(normalize(views, IMAGENET_MEAN, IMAGENET_STD), mask)

    def convnext_tokens(self, views):
        """(N, 1 + g*g, convnext dim) on the ViT's g x g grid; the cls is the mean of the grid."""
        S, g = views.shape[-1], views.shape[-1] // self.vit.cfg.patch
        x = normalize(views, CLIP_MEAN, CLIP_STD)
        size = self.convnext.cfg.input_size
        if size and size != S:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        cmap = self.convnext(x)
        if cmap.shape[-2:] != (g, g):
            cmap = F.interpolate(cmap, size=(g, g), mode="bilinear", align_corners=False)
        tokens = cmap.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)

    @staticmethod
    def reference_views(canvas):
        """The released models' views of a padded square canvas (N, 3, C, C) in [0, 1] (C = 1024), CLIP-
        normalised first as the reference's transform does: the 224 views (the canvas resized, then the
        quadrants of a 448 resize) and the C/2 views (the canvas resized, then its four quadrants), each
        (N * 5, 3, S, S) in the order global, top-left, top-right, bottom-left, bottom-right. Resizes as
        the reference: bicubic on half-precision tensors, no antialias."""
        canvas = normalize(canvas, CLIP_MEAN, CLIP_STD)
        half = canvas.shape[-1] // 2

        def resized(size):
            return F.interpolate(canvas.half(), size=(size, size), mode="bicubic").to(canvas.dtype)

        def with_quadrants(whole, x, s):
            parts = [x[..., :s, :s], x[..., :s, s:], x[..., s:, :s], x[..., s:, s:]]
            return torch.stack([whole] + parts, dim=1).flatten(0, 1)
        return with_quadrants(resized(224), resized(448), 224), with_quadrants(resized(half), canvas, half)

    @torch.no_grad()
    def reference_tokens(self, canvas):
        """The released models' frozen features (llama_ens5_light's encode_image; mixtral_sparse_ens5's with
        CLIP): ConvNeXt on the C/2 views with its grid mean as cls; DINOv2 on the 224 views re-normalised
        from CLIP to ImageNet statistics; CLIP ViT-L on the 224 views as they are. Returns
        (N * 5, 1 + g*g, [C_clip +] C_convnext + C_vit), channels in the reference's order."""
        v224, conv = self.reference_views(canvas)
        cmap = self.convnext(conv)
        g = 224 // self.vit.cfg.patch
        if cmap.shape[-2:] != (g, g):
            raise ValueError(f"reference path: ConvNeXt gives a {tuple(cmap.shape[-2:])} grid on {conv.shape[-1]}-pixel "
                             f"views, DINOv2 a {g}x{g} one on 224-pixel views; they must agree")
        ctok = cmap.flatten(2).transpose(1, 2)
        ctok = torch.cat([ctok.mean(1, keepdim=True), ctok], dim=1)
        c_mean, c_std, i_mean, i_std = (torch.tensor(v, dtype=v224.dtype, device=v224.device).view(1, 3, 1, 1)
                                        for v in (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD))
        vtok = self.vit(v224 * (c_std / i_std) + (c_mean - i_mean) / i_std)
        return torch.cat(([self.clip(v224)] if self.clip else []) + [ctok, vtok], dim=-1)

    @torch.no_grad()
    def reference_queries(self, canvas):
        """The Q-Former's queries read from the 224 views (CLIP-normalised): (N * 5, queries, dim)."""
        return self.qformer(self.reference_views(canvas)[0])

    def reference_forward(self, canvas, tp_group=None):
        """(N * 5, T, llm dim) image tokens per view on the released models' path: the projected frozen
        features, after the projected Q-Former queries when there is a Q-Former (mixtral_sparse_ens5's
        [qformer_proj(queries), visual_proj(features)]). Under TP each rank encodes a share of the canvases."""
        feats = self.proj(split_rows_and_gather(self.reference_tokens, canvas, tp_group))
        if self.qformer is None:
            return feats
        return torch.cat([self.qformer_proj(split_rows_and_gather(self.reference_queries, canvas, tp_group)), feats], 1)

    @torch.no_grad()
    def encode_frozen(self, views):
        if self.clip is not None or self.qformer is not None:
            raise ValueError("the original SPHINX's CLIP ViT and Q-Former run on the released models' image path "
                             "only (image_path='reference')")
        return torch.cat([self.convnext_tokens(views), self.vit_tokens(views)], dim=-1)

    def forward(self, views, tp_group=None):
        """Under TP each rank encodes its share of the views and the features are all-gathered (as the
        reference's model-parallel MoV does); the projector, replicated, then runs on all of them."""
        return self.proj(split_rows_and_gather(self.encode_frozen, views, tp_group))
