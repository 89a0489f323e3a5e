"""The released SPHINX-X checkpoints' image path, an adapter that plugs into `Sphinx` (its `mov`).

The paper's model tiles the photo at the top-left of its canvas and skips fully padded sub-images
(tiling.py, vision.py). The released checkpoints (LLaMA2-Accessory's llama_ens5_light and
mixtral_sparse_ens5) compute otherwise, and to run them as they were trained we do the same here:
- the photo is centred on a 1024 square padded with the CLIP mean (`reference_tile`); boxes in the
  answers are relative to that square;
- the model cuts five views itself: ConvNeXt sees 512-pixel ones, DINOv2 224-pixel ones re-normalised
  from CLIP to ImageNet statistics; no view is ever skipped;
- SPHINX-MoE-1k keeps the original SPHINX's CLIP ViT-L/14 and BLIP-2 Q-Former: CLIP channels go first
  in the concatenation, the Q-Former's 32 queries get their own projector and come first in each view.

`ReleasedMoV` subclasses `MixtureOfVisualExperts`, so the parameter names (`mov.convnext`, `mov.clip`,
`mov.qformer_proj`, ...) and everything downstream of the MoV are the core's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from checkpoint import CheckpointError, iter_safetensors, load_state_strict, map_name, safetensors_files
from formats.encoders import layout_rules
from parallel import split_rows_and_gather
from tiling import ImageError, ImageLayout, Tiles, centered_to_photo, to_rgb
from vision import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ConvNeXtConfig, MixtureOfVisualExperts, ViT,
                    ViTConfig, normalize)

# The original SPHINX's CLIP ViT-L/14 (OpenAI weights; SPHINX-MoE-1k keeps it): 224 px -> 16x16 + cls.
CLIP_VIT = dict(ffn="mlp", act="quick_gelu", layer_scale=False, patch_bias=False, pre_norm=True, mask_token=False)
CLIP_VITL14 = ViTConfig(dim=1024, depth=24, heads=16, patch=14, pos_grid=16, eps=1e-5, **CLIP_VIT)
CANVAS = 1024                      # the released models' canvas
REFERENCE_FILL = (122, 116, 104)   # the reference pads with the CLIP mean, int(x * 255) per channel


# ----------------------------------------------------------------------------- the centred canvas

def reference_tile(img: Image.Image, canvas: int = CANVAS) -> Tiles:
    """LLaMA2-Accessory's "padded_resize": the photo centred in a square padded with the CLIP mean,
    PIL-bicubic resized to the canvas, in [0, 1] (the model normalises it and cuts the five views)."""
    img = to_rgb(img)
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image of size {w}x{h} has no pixels")
    side = max(w, h)
    square = Image.new("RGB", (side, side), REFERENCE_FILL)
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    square = square.resize((canvas, canvas), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return Tiles(views=x[None], fully_padded=[False] * 5, grid=2, canvas=canvas,
                 resized=(round(w * canvas / side), round(h * canvas / side)))


@dataclass(frozen=True)
class ReleasedLayout(ImageLayout):
    """Five views (global + 2x2), none ever skipped; boxes relative to the centred square."""

    def tile(self, img: Image.Image) -> Tiles:
        return reference_tile(img, self.canvas)

    def block_len_for_size(self, w: int, h: int) -> int:
        return self.block_len([False] * (1 + self.grid * self.grid))

    def to_photo(self, xy, photo_size) -> list[float]:
        return centered_to_photo(xy, photo_size)


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


# ----------------------------------------------------------------------------- the adapter

class ReleasedMoV(MixtureOfVisualExperts):
    """The released models' MoV: the core's ConvNeXt + DINOv2 + projector, fed the reference's views, with
    SPHINX-MoE-1k's optional CLIP ViT-L and Q-Former."""

    def __init__(self, convnext: ConvNeXtConfig, vit: ViTConfig, llm_dim: int, clip: ViTConfig | None = None,
                 qformer: QFormerConfig | None = None):
        super().__init__(convnext, vit, llm_dim, extra_channels=clip.dim if clip else 0)
        self.clip = ViT(clip) if clip else None
        self.qformer = QFormer(qformer) if qformer else None
        self.qformer_proj = nn.Sequential(nn.Linear(qformer.dim, llm_dim), nn.LayerNorm(llm_dim)) if qformer else None

    def tokens_per_view(self, view_size: int = 224) -> int:       # DINOv2 fixes the grid: 224-pixel views
        return 1 + (224 // self.vit.cfg.patch) ** 2 + (self.qformer.cfg.queries if self.qformer else 0)

    def layout(self, canvas: int, grid: int, skip_tokens: bool) -> ImageLayout:
        return ReleasedLayout(canvas, 2, self.tokens_per_view(), False)

    def encoders(self) -> list[nn.Module]:
        return [m for m in (self.convnext, self.vit, self.clip, self.qformer) if m is not None]

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.qformer.query_tokens] if self.qformer else []

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

    def encode_images(self, images: list[Tiles], encoded, tp_group=None):
        w = self.proj[0].weight
        return self.reference_forward(torch.cat([t.views for t in images]).to(w.device, w.dtype), tp_group)

    def forward(self, views, tp_group=None):
        raise ValueError("the released models cut their views from the centred canvas: use encode_images")
