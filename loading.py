"""Our checkpoints: the LLM and a whole Sphinx (one safetensors file, the config as JSON in its metadata)
and the tiny base (`tools/pretrain.py` writes it; sparse upcycling fills an MoE LLM from it). Every
loader builds on the meta device and fills the model with `checkpoint.load_state_strict` (strict names
and shapes, each TP rank reading only its slices). Outside layouts (HF, the released checkpoints) are in
the formats/ wing, which renames into these same models."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import (CheckpointError, config_from_json, iter_safetensors, load_state_strict, read_safetensors_metadata,
                        save_safetensors_atomic, unique_state_dict, verify_safetensors)
from model import ModelConfig, Sphinx, SphinxConfig, Transformer, build_sphinx
from parallel import shard, tp_slice
from vision import ConvNeXtConfig, ViTConfig


# ----------------------------------------------------------------------------- the LLM

def tp_loading(tp_group, rename=None):
    """(select, shard) for load_state_strict and iter_safetensors so that a TP rank materialises only its
    shard: select reads just this rank's slice of a split tensor from a safetensors file (by our name,
    after rename); shard cuts a tensor that had to be read whole (InternLM2's packed wqkv, .pth files)."""
    if tp_group is None:
        return None, None
    rank, world = tp_group.rank(), tp_group.size()

    def select(src, shape):
        target = rename(src) if rename else (src, None)
        if target is None or target[0].endswith(".wqkv"):      # unknown (reported later), or packed
            return None
        try:
            return tp_slice(target[0], shape, rank, world, expert_slot=target[1] is not None)
        except ValueError:                                      # does not split: reported as mis-shaped
            return None
    return select, lambda name, t, expert_slot: shard(name, t, rank, world, expert_slot)


def save_llm(path, model: Transformer):
    """Our format: one safetensors file, the config as JSON in its metadata (one atomic write)."""
    save_safetensors_atomic(path, unique_state_dict(model),
                            {"format": "sphinx-x-llm", "config": json.dumps(asdict(model.cfg))})


def load_llm(path, device="cpu", dtype=torch.float32) -> Transformer:
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sphinx-x-llm":
        raise CheckpointError(f"{path}: not a sphinx-x LLM checkpoint (format {meta.get('format')!r})")
    with torch.device("meta"):
        model = Transformer(config_from_json(_config_text(meta, path), ModelConfig))
    load_state_strict(model, iter_safetensors([path]), dtype=dtype, device=device, where=str(path))
    return model


# ----------------------------------------------------------------------------- Sphinx, the base

def save_sphinx(path, model: Sphinx, extra: dict | None = None):
    """One safetensors file, the config as JSON in its metadata; written atomically."""
    meta = {"format": "sphinx-x", "config": json.dumps(asdict(model.cfg))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_safetensors_atomic(path, unique_state_dict(model), meta)


def _config_text(meta: dict, path) -> str:
    if "config" not in meta:
        raise CheckpointError(f"{path}: its metadata has no 'config' (written by another tool, or damaged)")
    return meta["config"]


def sphinx_config_from_json(text: str) -> SphinxConfig:
    d = json.loads(text)
    # Fields files from before the released image path became an adapter carry at their defaults.
    if (d.pop("image_path", "ours"), d.pop("clip", None), d.pop("qformer", None)) != ("ours", None, None):
        raise CheckpointError("this checkpoint uses the released models' image path: load it with formats.released")
    try:
        return SphinxConfig(llm=config_from_json(json.dumps(d.pop("llm")), ModelConfig),
                            convnext=_tuples(ConvNeXtConfig, d.pop("convnext")),
                            vit=_tuples(ViTConfig, d.pop("vit")), **d)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"config does not describe a SPHINX-X model: {e}") from None


def _tuples(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_sphinx(path, device="cpu", dtype=torch.float32, tp_group=None, verify=True, **overrides) -> Sphinx:
    """Our checkpoint -> Sphinx. overrides (e.g. skip_tokens=False) replace config fields. tp_group: build
    and read only this rank's TP shard. verify=False: the caller checked the digest (train.py, once per run)."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sphinx-x":
        raise CheckpointError(f"{path}: not a sphinx-x checkpoint (format {meta.get('format')!r})")
    cfg = replace(sphinx_config_from_json(_config_text(meta, path)), **overrides)
    if verify:
        verify_safetensors(path)
    model = build_sphinx(cfg, init=False, tp_group=tp_group)
    select, cut = tp_loading(tp_group)
    load_state_strict(model, iter_safetensors([path], select), dtype=dtype, device=device, where=str(path), shard=cut)
    model.mov.freeze_encoders()
    return model


BASE_PARTS = ("llm.", "mov.convnext.", "mov.vit.")
IMAGE_TAGS = ("begin_of_image", "end_of_image", "skip_token")
IMAGE_PARTS = ("mov.proj.",) + IMAGE_TAGS          # fitted by the scene-token stage
SCENE_PREFIX = "scene_tokens."     # the scene stage's own projector: pretrain.py refits the real one from it


def save_base(path, model: Sphinx, summary: dict, scene_proj: nn.Module | None = None):
    """The pretrained parts of a CPU size (pretrain.py): LLM and both encoders; with a scene-token stage
    (scene_proj given) also the projector fitted to it, the image tags and the skip token."""
    parts = BASE_PARTS + (IMAGE_PARTS if scene_proj is not None else ())
    state = {k: v for k, v in unique_state_dict(model).items() if k.startswith(parts)}
    if scene_proj is not None:
        state |= {SCENE_PREFIX + "proj." + k: v for k, v in scene_proj.state_dict().items()}
    save_safetensors_atomic(path, state, {"format": "sphinx-x-base", "config": json.dumps(asdict(model.cfg)),
                                          "summary": json.dumps(summary)})


def tensor_shape(path, name: str) -> list[int] | None:
    """The shape of a stored tensor, read from the file's header; None if the file has no such tensor."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as sf:
        return sf.get_slice(name).get_shape() if name in sf.keys() else None


def base_has_projector(path) -> bool:
    return tensor_shape(path, "mov.proj.0.weight") is not None


def has_scene_tokens(path) -> bool:
    """The base's LLM went through pretrain.py's scene-token stage (its projector is stored)."""
    return tensor_shape(path, SCENE_PREFIX + "proj.0.weight") is not None


def load_scene_parts(path, scene: Sphinx):
    """The scene-token stage's projector, image tags and skip token of a base into `scene` (pretrain.py)."""
    want = {SCENE_PREFIX + "proj." + k: "mov.proj." + k for k in scene.mov.proj.state_dict()}
    want |= {n: n for n in IMAGE_TAGS}
    found = {want[n]: t for n, t in iter_safetensors([path]) if n in want}
    if len(found) != len(want):
        raise CheckpointError(f"{path}: no scene-token stage in this base (missing {sorted(set(want.values()) - set(found))})")
    scene.load_state_dict(found, strict=False)


def upcycle(name: str, t: torch.Tensor, cfg: ModelConfig):
    """Sparse upcycling: a dense FFN weight becomes every expert's copy of it (the router stays fresh),
    so the MoE model starts out computing exactly the dense one (top-k weights sum to 1)."""
    if cfg.n_experts and ".feed_forward.w" in name and name.endswith(".weight"):
        return [(name.removesuffix(".weight"), t.expand(cfg.n_experts, *t.shape))]
    return [(name, t)]


def load_base(path, cfg: SphinxConfig, device="cpu", dtype=torch.float32) -> Sphinx:
    """A Sphinx whose LLM and encoders come from a base file; the projector, image tags and skip token too
    when the base has them (fitted by its scene-token stage), else fresh, as the paper's one-stage tuning
    starts. A dense base fills a MoE LLM by upcycling."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sphinx-x-base":
        raise CheckpointError(f"{path}: not a sphinx-x base (format {meta.get('format')!r}); make one with pretrain.py")
    base = sphinx_config_from_json(_config_text(meta, path))
    verify_safetensors(path)
    want = replace(cfg, llm=replace(cfg.llm, n_experts=0, top_k=2, ffn_dim=base.llm.ffn_dim))
    if (base.llm, base.convnext, base.vit) != (want.llm, want.convnext, want.vit):
        raise CheckpointError(f"{path}: its LLM/encoder config differs from the model's:\n  base  {base}\n  model {cfg}")
    model = build_sphinx(cfg, device, dtype)
    parts = model if base_has_projector(path) else \
        nn.ModuleDict({"llm": model.llm, "mov": nn.ModuleDict({"convnext": model.mov.convnext, "vit": model.mov.vit})})
    expand = (lambda n, t: upcycle(n, t, cfg.llm)) if cfg.llm.n_experts else None
    fresh_routers = [(n, t.detach().clone()) for n, t in parts.state_dict().items() if n.endswith(".gate.weight")]
    tensors = ((n, t) for n, t in iter_safetensors([path]) if not n.startswith(SCENE_PREFIX))
    load_state_strict(parts, itertools.chain(tensors, fresh_routers), expand=expand,
                      dtype=dtype, device=device, where=str(path))
    model.mov.freeze_encoders()
    return model


def tokenizer_beside(checkpoint) -> Path | None:
    """The tokenizer.json a checkpoint of ours was trained with: beside it in its run directory, or one level
    up for a step-N/ checkpoint; None if neither exists."""
    here = Path(checkpoint).resolve().parent
    return next((p for p in (here / "tokenizer.json", here.parent / "tokenizer.json") if p.exists()), None)


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """The fields that shape the weights agree (context length and RoPE scaling may differ)."""
    keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "tie_embeddings", "n_experts")
    return all(getattr(a, k) == getattr(b, k) for k in keep)


def base_summary(path) -> dict:
    return json.loads(read_safetensors_metadata(path).get("summary", "{}"))
