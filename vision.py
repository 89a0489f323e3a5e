"""The Mixture of Visual experts (MoV, paper Sec. 3.1): CLIP-ConvNeXt + DINOv2 -> projector.

Read top to bottom: configs, ConvNeXt, the DINOv2-style ViT, then `MixtureOfVisualExperts`,
which runs both frozen encoders on every view, aligns their token grids, concatenates
channels and projects them to the LLM width. Outside checkpoint layouts (HF, timm/open_clip,
original DINOv2) are renamed into these modules by formats/encoders.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import split_rows_and_gather
from tiling import ImageLayout, Tiles

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
                    "tiny": ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(24, 48, 96, 128), input_size=128)}
VIT_CONFIGS = {"dinov2-vitg14": ViTConfig(pos_interp="dinov2"),
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
    With CLIP's settings (formats/released_vision.CLIP_VIT), OpenAI's CLIP ViT: ln_pre, QuickGELU, no layer scale;
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

    def __init__(self, convnext: ConvNeXtConfig, vit: ViTConfig, llm_dim: int, extra_channels: int = 0):
        super().__init__()
        self.convnext = ConvNeXt(convnext)
        self.vit = ViT(vit)
        self.proj = nn.Sequential(nn.Linear(convnext.dims[-1] + vit.dim + extra_channels, llm_dim), nn.LayerNorm(llm_dim))

    def tokens_per_view(self, view_size: int) -> int:
        return 1 + (view_size // self.vit.cfg.patch) ** 2

    def layout(self, canvas: int, grid: int, skip_tokens: bool) -> ImageLayout:
        """How the LLM sees an image: a global view + grid x grid sub-images of the canvas (tiling.py)."""
        return ImageLayout(canvas, grid, self.tokens_per_view(canvas // grid), skip_tokens)

    def encoders(self) -> list[nn.Module]:
        return [self.convnext, self.vit]

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
        for p in [p for v in vits for p in (v.cls_token, v.pos_embed, v.mask_token)] + self.extra_parameters():
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

    @torch.no_grad()
    def encode_frozen(self, views):
        return torch.cat([self.convnext_tokens(views), self.vit_tokens(views)], dim=-1)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learned vectors of encoders an image path adds (none here), initialised like the cls tokens."""
        return []

    def encode_images(self, images: list[Tiles], encoded: list[list[bool]], tp_group=None):
        """(views encoded, T, llm dim): every encoded view of a batch's images through the MoV at once."""
        views = [v for t, enc in zip(images, encoded) for v, e in zip(t.views, enc) if e]
        if not views:
            return None
        w = self.proj[0].weight
        return self(torch.stack(views).to(w.device, w.dtype), tp_group)

    def forward(self, views, tp_group=None):
        """Under TP each rank encodes its share of the views and the features are all-gathered (as the
        reference's model-parallel MoV does); the projector, replicated, then runs on all of them."""
        return self.proj(split_rows_and_gather(self.encode_frozen, views, tp_group))
