"""HF-format LLMs (Llama / TinyLlama / LLaMA-2, InternLM2's packed `wqkv`, Mixtral's per-expert tensors)
renamed into model.py's Transformer, and the paper's start from downloaded parts (Sec. 3.2): a HF LLM and
the two pretrained encoders with a fresh projector."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import CheckpointError, compile_rules, iter_safetensors, load_state_strict, map_name, safetensors_files
from formats.encoders import load_encoder
from loading import same_architecture, tp_loading
from model import ModelConfig, Sphinx, SphinxConfig, Transformer, build_sphinx


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
