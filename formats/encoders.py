"""Outside key layouts of the vision encoders, renamed into vision.py's modules.

ConvNeXt: HF transformers (`ConvNextModel`) and timm/open_clip (`visual.trunk.stages.0.blocks.0.conv_dw.weight`).
ViT: HF (`Dinov2Model`), original DINOv2 (`blocks.0.attn.qkv.weight`, `blocks.0.ls1.gamma`, `blocks.0.mlp.w12`),
and CLIP's ViT (OpenAI / open_clip, HF `CLIPVisionModel`). The layout is recognised from the key names.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from checkpoint import CheckpointError, compile_rules, iter_safetensors, load_state_strict, map_name, safetensors_files
from vision import ViT

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
