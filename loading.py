"""Loading and saving: the LLM from the layouts users download (HF Llama / TinyLlama / LLaMA-2, InternLM2,
Mixtral safetensors), our own checkpoint format for the LLM and for a whole Sphinx, weight mixing, the
tiny base (`pretrain.py` writes it; sparse upcycling fills an MoE LLM from it) and the paper sizes'
pretrained parts. Every loader builds on the meta device and fills the model with
`checkpoint.load_state_strict` (strict names and shapes, each TP rank reading only its slices)."""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import (CheckpointError, compile_rules, config_from_json, iter_safetensors, load_state_strict,
                        map_name, read_safetensors_metadata, safetensors_files, save_safetensors_atomic,
                        unique_state_dict, verify_safetensors)
from model import ModelConfig, Sphinx, SphinxConfig, Transformer, build_sphinx
from parallel import shard, tp_slice
from vision import ConvNeXtConfig, QFormerConfig, ViTConfig, load_encoder


# ----------------------------------------------------------------------------- the LLM: HF layouts, our format

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
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "dynamic", None):
        raise CheckpointError(f"rope scaling {rope} is not supported (only dynamic NTK)")
    max_pos = hf.get("max_position_embeddings", 4096)
    factor = float(rope.get("factor", 1.0)) if kind == "dynamic" else 0.0
    cfg = ModelConfig(
        dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta", 10000.0)),
        # Dynamic NTK has no hard end; allow the factor's multiple of the trained length.
        max_seq_len=int(max_pos * factor) if factor > 1 else max_pos,
        rope_dynamic_factor=factor if factor > 1 else 0.0, rope_original_max=max_pos if factor > 1 else 0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_experts=hf.get("num_local_experts", 0), top_k=hf.get("num_experts_per_tok", 2))
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"head_dim {hf['head_dim']} != hidden_size / heads ({cfg.head_dim}) is not supported")
    if hf.get("attention_bias") or hf.get("bias"):
        raise CheckpointError("attention biases are not supported")
    return cfg, layout


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


def load_hf(path, device="cpu", dtype=torch.float32, tp_group=None) -> Transformer:
    """A HF-format directory: config.json + model.safetensors (or sharded with an index). tp_group:
    build and read only this rank's TP shard."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json (expected a HF-format model directory)")
    cfg, layout = config_from_hf(json.loads((path / "config.json").read_text()))
    rules = compile_rules(_INTERNLM2_RULES if layout == "internlm2" else _LLAMA_RULES)

    def expand(name, t):
        if name.endswith(".wqkv"):
            if t.shape != ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim):
                return [(name + ".weight", t)]        # reported as unexpected, by its source name
            base = name[: -len("wqkv")]
            return list(zip((base + "wq.weight", base + "wk.weight", base + "wv.weight"),
                            unpack_internlm2_wqkv(t, cfg)))
        return [(name, t)]

    rename = lambda n: map_name(n, rules)
    select, cut = tp_loading(tp_group, rename)
    with torch.device("meta"):
        model = Transformer(cfg, tp_group)
    load_state_strict(model, iter_safetensors(safetensors_files(path), select), rename, expand, dtype, device,
                      where=str(path), shard=cut)
    return model


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


# ----------------------------------------------------------------------------- Sphinx: our format, mixing, the base, parts

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
    try:
        clip, qformer = d.pop("clip", None), d.pop("qformer", None)
        if qformer is not None:
            qformer = QFormerConfig(**{**qformer, "vision": _tuples(ViTConfig, qformer["vision"])})
        return SphinxConfig(llm=config_from_json(json.dumps(d.pop("llm")), ModelConfig),
                            convnext=_tuples(ConvNeXtConfig, d.pop("convnext")),
                            vit=_tuples(ViTConfig, d.pop("vit")), clip=clip and _tuples(ViTConfig, clip),
                            qformer=qformer, **d)
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


def mix_weights(a: Sphinx, b: Sphinx, beta: float, parts=("llm.",)) -> Sphinx:
    """SPHINX's weight mix (arXiv 2311.07575, its pre-training stage): theta = beta * a + (1 - beta) * b
    over the tensors under `parts` (the LLM: one tuned on real-world data, one on synthetic data, from a shared
    start), computed in fp32; every other tensor (encoders, projector, image tags) is a's. Returns a new
    model; a and b are left as they are."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], not {beta}")
    if a.cfg != b.cfg:
        raise CheckpointError(f"the two models differ in configuration:\n  a {a.cfg}\n  b {b.cfg}")
    sa, sb = unique_state_dict(a), unique_state_dict(b)
    mixed = {n: ((beta * t.float() + (1 - beta) * sb[n].float()).to(t.dtype) if n.startswith(parts) else t.clone())
             for n, t in sa.items()}
    model = build_sphinx(a.cfg, init=False)
    load_state_strict(model, mixed.items(), dtype=next(a.parameters()).dtype, where="mixed weights")
    model.mov.freeze_encoders()
    return model


BASE_PARTS = ("llm.", "mov.convnext.", "mov.vit.")


def save_base(path, model: Sphinx, summary: dict):
    """The pretrained parts of a CPU size (pretrain.py): LLM and both encoders, no projector or tags."""
    state = {k: v for k, v in unique_state_dict(model).items() if k.startswith(BASE_PARTS)}
    save_safetensors_atomic(path, state, {"format": "sphinx-x-base", "config": json.dumps(asdict(model.cfg)),
                                          "summary": json.dumps(summary)})


def upcycle(name: str, t: torch.Tensor, cfg: ModelConfig):
    """Sparse upcycling: a dense FFN weight becomes every expert's copy of it (the router stays fresh),
    so the MoE model starts out computing exactly the dense one (top-k weights sum to 1)."""
    if cfg.n_experts and ".feed_forward.w" in name and name.endswith(".weight"):
        return [(name.removesuffix(".weight"), t.expand(cfg.n_experts, *t.shape))]
    return [(name, t)]


def load_base(path, cfg: SphinxConfig, device="cpu", dtype=torch.float32) -> Sphinx:
    """A fresh Sphinx (projector, image tags and skip token newly initialised, as the paper's one-stage
    tuning starts) whose LLM and encoders come from a base file. A dense base fills a MoE LLM by upcycling."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "sphinx-x-base":
        raise CheckpointError(f"{path}: not a sphinx-x base (format {meta.get('format')!r}); make one with pretrain.py")
    base = sphinx_config_from_json(_config_text(meta, path))
    verify_safetensors(path)
    want = replace(cfg, llm=replace(cfg.llm, n_experts=0, top_k=2, ffn_dim=base.llm.ffn_dim))
    if (base.llm, base.convnext, base.vit) != (want.llm, want.convnext, want.vit):
        raise CheckpointError(f"{path}: its LLM/encoder config differs from the model's:\n  base  {base}\n  model {cfg}")
    model = build_sphinx(cfg, device, dtype)
    parts = nn.ModuleDict({"llm": model.llm, "mov": nn.ModuleDict({"convnext": model.mov.convnext, "vit": model.mov.vit})})
    expand = (lambda n, t: upcycle(n, t, cfg.llm)) if cfg.llm.n_experts else None
    fresh_routers = [(n, t.detach().clone()) for n, t in parts.state_dict().items() if n.endswith(".gate.weight")]
    load_state_strict(parts, itertools.chain(iter_safetensors([path]), fresh_routers), expand=expand,
                      dtype=dtype, device=device, where=str(path))
    model.mov.freeze_encoders()
    return model


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """The fields that shape the weights agree (context length and RoPE scaling may differ)."""
    keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "tie_embeddings", "n_experts")
    return all(getattr(a, k) == getattr(b, k) for k in keep)


FRESH_PARTS = ("mov.proj.", "begin_of_image", "end_of_image", "skip_token")   # what one-stage tuning creates


def load_parts(cfg: SphinxConfig, llm_dir, convnext_path, vit_path, projector=None, device="cpu",
               dtype=torch.float32, tp_group=None, **overrides) -> Sphinx:
    """The paper's start (Sec. 3.2): a pretrained HF-format LLM and the two pretrained encoders (HF, timm
    or DINOv2 layouts), with a fresh projector, image tags and skip token, or, given `projector`, those
    read from that safetensors file (a tuned model shipped as parts). The LLM keeps its own config.json's
    context length and RoPE settings; overrides (e.g. skip_tokens=False) replace config fields. tp_group:
    only this rank's TP shard of the LLM is built and read (the rest is replicated)."""
    llm = load_hf(llm_dir, device, dtype, tp_group)
    if not same_architecture(llm.cfg, cfg.llm):
        raise CheckpointError(f"{llm_dir}: its LLM ({llm.cfg}) is not this size's ({cfg.llm})")
    model = build_sphinx(replace(cfg, llm=llm.cfg, **overrides), init=False, tp_group=tp_group)  # meta: no init twice
    model.llm = llm
    load_encoder(model.mov.convnext, convnext_path, dtype, device)
    load_encoder(model.mov.vit, vit_path, dtype, device)
    fresh = nn.ModuleDict({"mov": nn.ModuleDict({"proj": model.mov.proj})})
    for name in FRESH_PARTS[1:]:
        fresh.register_parameter(name, getattr(model, name))
    if projector is not None:
        load_state_strict(fresh, ((k, t) for k, t in iter_safetensors([projector]) if k.startswith(FRESH_PARTS)),
                          dtype=dtype, device=device, where=str(projector))
    else:
        fresh.to_empty(device=device).to(dtype)
        with torch.no_grad():                                        # as Sphinx.init_weights
            lin, norm = model.mov.proj
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
            for name in FRESH_PARTS[1:]:
                nn.init.normal_(getattr(fresh, name), std=0.02)
    for name in FRESH_PARTS[1:]:                       # to_empty/assign replaced them inside `fresh` only
        setattr(model, name, getattr(fresh, name))
    model.mov.freeze_encoders()
    return model


def base_summary(path) -> dict:
    return json.loads(read_safetensors_metadata(path).get("summary", "{}"))
