"""The Mixture of Visual experts (MoV, paper Sec. 3.1): CLIP-ConvNeXt + DINOv2 -> projector.

Read top to bottom: configs, ConvNeXt, the DINOv2-style ViT, checkpoint key layouts
(HF transformers, timm/open_clip, original DINOv2), then `MixtureOfVisualExperts`,
which runs both frozen encoders on every view, aligns their token grids, concatenates
channels and projects them to the LLM width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# CLIP normalisation for ConvNeXt (open_clip laion2b), ImageNet for DINOv2 (DESIGN.md).
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

    @property
    def hidden(self) -> int:
        h = int(self.dim * self.mlp_ratio)
        return (int(h * 2 / 3) + 7) // 8 * 8 if self.ffn == "swiglu" else h   # DINOv2's SwiGLU width


CONVNEXT_CONFIGS = {"convnext-xxlarge": ConvNeXtConfig(),
                    "tiny": ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), input_size=None)}
VIT_CONFIGS = {"dinov2-vitg14": ViTConfig(),
               "tiny": ViTConfig(dim=64, depth=2, heads=4, patch=8, pos_grid=4, ffn="mlp")}


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

    @property
    def out_dim(self) -> int:
        return self.cfg.dims[-1]

    def forward_features(self, x):
        """The stride-32 map before the head norm: (B, C, H/32, W/32)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return x

    def forward(self, x):
        return self.head_norm(self.forward_features(x))


# ----------------------------------------------------------------------------- DINOv2 ViT

class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim))
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.swiglu = cfg.ffn == "swiglu"
        # SwiGLU: fc1 computes [gate | up] in one matmul (DINOv2's w12), fc2 is w3.
        self.fc1 = nn.Linear(cfg.dim, (2 if self.swiglu else 1) * cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.dim)
        self.ls2 = nn.Parameter(torch.ones(cfg.dim))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.ls1 * self.proj(a)
        h = self.fc1(self.norm2(x))
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return x + self.ls2 * self.fc2(h)


class ViT(nn.Module):
    """DINOv2: patch embedding, cls token, bicubically interpolated learned positions, blocks, final norm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid ** 2, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))  # unused here; in every DINOv2 checkpoint
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def positions(self, gh: int, gw: int):
        g = self.cfg.pos_grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(self.pos_embed.dtype)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x):
        """(B, 3, H, W) -> final-norm tokens (B, 1 + H/p * W/p, dim), cls first."""
        gh, gw = x.shape[2] // self.cfg.patch, x.shape[3] // self.cfg.patch
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.positions(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
