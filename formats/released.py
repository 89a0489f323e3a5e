"""The released SPHINX-X checkpoints: LLaMA2-Accessory's consolidated layout, read into our Sphinx and written back.

A released model directory (e.g. SPHINX-Tiny-1k) holds
    consolidated.00-of-02.model.pth, consolidated.01-of-02.model.pth   torch.save({"model": state_dict})
    config.json      the reference's ModelArgs (dim, n_layers, n_heads, n_kv_heads, multiple_of, ...)
    meta.json        {"llama_type": "llama_ens5_light"}: the module under accessory/model/LLM that built it
    tokenizer.model  SentencePiece
Every key starts with `llma.`. Facts this file relies on, read from the reference code
(Alpha-VLLM/LLaMA2-Accessory):
  - accessory/util/tensor_parallel.py: one file per model-parallel rank; ColumnParallelLinear weights
    are split on dim 0, RowParallelLinear on dim 1, ParallelEmbedding on dim 1 (the embedding dim);
    everything else is replicated in every shard.
  - accessory/model/LLM/llama_ens5_light.py: wq wk wv, feed_forward w1 w3 and output are column-parallel;
    wo and feed_forward w2 row-parallel; tok_embeddings a ParallelEmbedding; the FFN width is
    int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of; the encoders are
    open_clip's ConvNeXt-XXL trunk (timm names) as `openclip_convnext_xxl` and torch.hub's DINOv2
    ViT-g/14 (its own names) as `dinov2_vitg14`; `visual_proj` = Linear + LayerNorm; the image tags
    `start_img` / `end_img` have shape (1, 1, dim).
  - accessory/model/LLM/mixtral_sparse_ens5.py (SPHINX-MoE-1k): the same plus open_clip's ViT-L-14 as
    `clip` (text transformer set to None, the rest of its text side kept) and a transformers Blip2Model
    as `qformer` (language model and projection set to None); per view the Q-Former's 32 queries through
    `qformer_proj` come first, then `visual_proj` over cat(CLIP, ConvNeXt, DINOv2) = 1024 + 3072 + 1536.
  - accessory/model/LLM/llama.py: rotary embeddings on adjacent pairs of each head's dimensions
    (complex multiplication), Meta's layout; we (and HF) rotate the two halves, so the rows of wq and
    wk are permuted on the way in and back on the way out.
"""
from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

import loading as L
import model as M
from checkpoint import CheckpointError, current_umask, load_state_strict, map_name, unique_state_dict
from formats.encoders import CLIP_LAYOUTS, CONVNEXT_LAYOUTS, VIT_LAYOUTS, layout_rules, with_batch_dim
from formats.released_vision import (CANVAS, CLIP_VITL14, QFORMER_LAYOUT, QFORMER_UNUSED, QFormerConfig, ReleasedMoV,
                                     merge_q_v_bias)

SHARD_NAME = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
SUPPORTED = {"llama_ens5_light", "mixtral_sparse_ens5"}
# mixtral_sparse_ens5.py's MoE: w1 w2 w3 without ".weight", each (E * H, dim), expert e owning rows
# e*H .. (e+1)*H; w1 and w3 are used as x @ w.T, w2 untransposed (h @ w2_e); a model-parallel shard
# holds a slice of every expert's rows (_sparse_expert_merge).
EXPERT = re.compile(r"^layers\.\d+\.feed_forward\.w[123]$")
LLM_PART = re.compile(r"^(tok_embeddings|output|norm|layers\.\d+\.)")
SPLIT_DIM = [(re.compile(r"^layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight$"), 0),
             (re.compile(r"^output\.weight$"), 0),
             (re.compile(r"^layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$"), 1),
             (re.compile(r"^tok_embeddings\.weight$"), 1)]
ENCODERS = {"openclip_convnext_xxl.": ("mov.convnext.", CONVNEXT_LAYOUTS["timm"]),
            "dinov2_vitg14.": ("mov.vit.", VIT_LAYOUTS["dinov2"]),
            # mixtral_sparse_ens5 (SPHINX-MoE-1k): open_clip's ViT-L-14 (text tower dropped) and a Blip2Model
            "clip.visual.": ("mov.clip.", CLIP_LAYOUTS["openai"]),
            "qformer.": ("mov.qformer.", QFORMER_LAYOUT)}
OURS = {f"{ref}.{i}.{p}": f"{ours}.{i}.{p}" for ref, ours in (("visual_proj", "mov.proj"), ("qformer_proj", "mov.qformer_proj"))
        for i in (0, 1) for p in ("weight", "bias")} | {"start_img": "begin_of_image", "end_img": "end_of_image"}
# Held by the reference but never used for images: open_clip's text side (only its transformer is set
# to None), CLIP's joint-space projection, and Blip2Model's language parts.
# SPHINX-MoE-1k's extra encoders (the original SPHINX's): CLIP ViT-L/14 and BLIP-2 opt-2.7b's Q-Former.
MOE1K_ENCODERS = {"clip": CLIP_VITL14, "qformer": QFormerConfig()}
UNUSED = re.compile(r"^clip\.(token_embedding|positional_embedding|ln_final|text_projection|logit_scale|visual\.proj$)")


def split_dim(name: str) -> int | None:
    """The dim a model-parallel shard splits (name without `llma.`), None if replicated."""
    return next((d for pat, d in SPLIT_DIM if pat.match(name)), None)


def reference_ffn_dim(args: dict) -> int:
    """The FFN width llama_ens5_light's FeedForward derives from ModelArgs."""
    hidden = int(2 * (4 * args["dim"]) / 3)
    if args.get("ffn_dim_multiplier") is not None:
        hidden = int(args["ffn_dim_multiplier"] * hidden)
    m = args.get("multiple_of", 256)
    return m * ((hidden + m - 1) // m)


def llm_config(args: dict) -> M.ModelConfig:
    """Our LLM config from the reference's ModelArgs (config.json): dense or, with `moe`, Mixtral."""
    if args.get("rope_scaling") not in (None, 1, 1.0):
        raise CheckpointError(f"config.json: rope_scaling {args['rope_scaling']} is not supported")
    moe = args.get("moe") or {}
    if args.get("head_dim") not in (None, args["dim"] // args["n_heads"]):
        raise CheckpointError(f"config.json: head_dim {args['head_dim']} is not dim / n_heads")
    return M.ModelConfig(dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
                         n_kv_heads=args.get("n_kv_heads") or args["n_heads"], vocab_size=args["vocab_size"],
                         ffn_dim=args["hidden_dim"] if moe else reference_ffn_dim(args), norm_eps=args.get("norm_eps", 1e-5),
                         rope_theta=float(args.get("rope_theta", 10000.0)), max_seq_len=args.get("max_seq_len", 4096),
                         n_experts=moe.get("num_experts", 0), top_k=moe.get("num_experts_per_tok", 2))


def rope_rows(w: torch.Tensor, n_heads: int, to_ours: bool) -> torch.Tensor:
    """Permute the rows of wq / wk between Meta's pairwise RoPE layout and our half-split one."""
    rows, cols = w.shape
    hd = rows // n_heads
    if to_ours:      # per head, rows (0, 1), (2, 3), ... -> (0, hd/2), (1, hd/2 + 1), ...
        return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- reading

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def shard_files(path: Path) -> list[Path]:
    """The consolidated shards in rank order; a missing or extra rank is an error."""
    found = {}
    for f in path.iterdir():
        m = SHARD_NAME.match(f.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN-of-MM.model.pth files (not a released SPHINX-X directory)")
    if len(found) > 1:
        raise CheckpointError(f"{path}: shards of several model-parallel sizes ({sorted(found)}); keep one set")
    (mp, ranks), = found.items()
    if sorted(ranks) != list(range(mp)):
        raise CheckpointError(f"{path}: {mp} model-parallel shards expected, missing rank(s) "
                              f"{sorted(set(range(mp)) - set(ranks))}")
    return [ranks[r] for r in range(mp)]


def _load_shard(f: Path) -> dict:
    # weights_only: a pickle that would run code is refused; mmap: tensors stay on disk until used.
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{f}: refused, not a plain tensor file ({str(e).splitlines()[0]})") from None
    except Exception as e:     # truncated zip, wrong magic: torch raises many types
        raise CheckpointError(f"{f}: unreadable checkpoint shard ({type(e).__name__}: {e})") from None
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{f}: expected {{'model': {{name: tensor}}}}")
    return sd


def merged_tensors(files: list[Path], n_experts: int = 0):
    """(name without `llma.`, full tensor) pairs, shards concatenated by the reference's rules,
    one tensor at a time."""
    shards = [_load_shard(f) for f in files]
    names = list(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if set(sd) != set(names):
            raise CheckpointError(f"{f}: holds other tensors than {files[0].name} "
                                  f"(differ: {sorted(set(sd) ^ set(names))[:5]})")
    for key in names:
        if not key.startswith("llma."):
            raise CheckpointError(f"{files[0]}: {key!r} lacks the 'llma.' prefix of the consolidated layout")
        name = key[len("llma."):]
        dim = split_dim(name) if LLM_PART.match(name) else None
        parts = [sd.pop(key) for sd in shards]
        if n_experts and EXPERT.match(name) and len(parts) > 1:        # every expert's rows, shard by shard
            d = parts[0].shape[-1]
            yield name, torch.cat([p.view(n_experts, -1, d) for p in parts], dim=1).view(-1, d)
        else:
            yield name, parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def _rules():
    return {prefix: (ours, layout_rules(layout)) for prefix, (ours, layout) in ENCODERS.items()}


def to_our_names(named, cfg: M.ModelConfig):
    """Reference names -> ours (with expert slots None); wq / wk rows permuted to our RoPE layout; unused
    text-side tensors skipped; older Blip2 q_bias / v_bias merged into one qkv bias."""
    rules = _rules()
    for name, t in merge_q_v_bias(named):
        if UNUSED.match(name) or (name.startswith("qformer.") and QFORMER_UNUSED.match(name[len("qformer."):])):
            continue
        if LLM_PART.match(name):
            heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}.get(name.split(".", 2)[-1])
            if heads and t.shape == (heads * cfg.head_dim, cfg.dim):      # a wrong shape is reported below
                t = rope_rows(t, heads, to_ours=True)
            if cfg.n_experts and EXPERT.match(name) and t.shape == (cfg.n_experts * cfg.ffn_dim, cfg.dim):
                per = t.view(cfg.n_experts, cfg.ffn_dim, cfg.dim)
                for e in range(cfg.n_experts):          # ours: w1, w3 (E, H, d); w2 (E, d, H)
                    yield ("llm." + name, e), f"{name}[expert {e}]", per[e].T if name.endswith("w2") else per[e]
                continue
            yield ("llm." + name, None), name, t
        elif name in OURS:
            yield (OURS[name], None), name, t.reshape(-1) if name in ("start_img", "end_img") else t
        else:
            prefix = next((p for p in rules if name.startswith(p)), None)
            target = map_name(name[len(prefix):], rules[prefix][1]) if prefix else None
            if target is None:
                yield None, name, t                                  # reported as unexpected
            else:
                yield (rules[prefix][0] + target[0], None), name, with_batch_dim(target[0], t)


def load_released(path, cfg: M.SphinxConfig | None = None, device="cpu", dtype=torch.float32,
                  tp_group=None, clip=None, qformer=None) -> M.Sphinx:
    """A released SPHINX-X directory -> our Sphinx computing as the reference does: its image path (photo
    centred on a 1024 canvas, formats/released_vision.py) and no skip tokens (never learnt).
    cfg: the vision side (default: the paper's encoders); the LLM comes from config.json; clip, qformer:
    SPHINX-MoE-1k's extra encoders' configs (default: CLIP ViT-L/14, BLIP-2 opt-2.7b's). tp_group: only
    this rank's TP shard is kept (the memory-mapped shards are merged one tensor at a time)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a released SPHINX-X model is a directory)")
    llama_type = _read_json(path / "meta.json").get("llama_type")
    if llama_type not in SUPPORTED:
        raise CheckpointError(f"{path}: llama_type {llama_type!r} is not supported (supported: {sorted(SUPPORTED)})")
    llm = llm_config(_read_json(path / "config.json"))
    base = cfg or M.sphinx_config("sphinx-tiny")
    extra = {}
    if llama_type == "mixtral_sparse_ens5":      # SPHINX-MoE-1k keeps the original SPHINX's CLIP ViT-L and Q-Former
        extra = dict(clip=clip or MOE1K_ENCODERS["clip"], qformer=qformer or MOE1K_ENCODERS["qformer"])
    cfg = M.SphinxConfig(llm, base.convnext, base.vit, canvas=CANVAS, grid=2, skip_tokens=False)
    model = M.build_sphinx(cfg, init=False, tp_group=tp_group,
                           mov=lambda: ReleasedMoV(base.convnext, base.vit, llm.dim, **extra))
    # The released models never learnt a skip token (they encode every sub-image); ours is unused.
    no_skip = [(("skip_token", None), "(no skip token)", torch.zeros(llm.dim))]
    _load_renamed(model, itertools.chain(to_our_names(merged_tensors(shard_files(path), llm.n_experts), llm), no_skip),
                  dtype=dtype, device=device, where=f"{path} ({llama_type})", shard=L.tp_loading(tp_group)[1])
    model.mov.freeze_encoders()
    return model


def _load_renamed(module, triples, **kw):
    """load_state_strict over (our target, source name, tensor) triples: problems are reported by source name."""
    targets = {}

    def named():
        for target, src, t in triples:
            targets[src] = target
            yield src, t
    return load_state_strict(module, named(), lambda src: targets.pop(src), **kw)


def load_released_llm(path, device="cpu", dtype=torch.float32) -> M.Transformer:
    """Only the LLM of a released directory (dense or mixtral_sparse_ens5's sparse MoE), strictly;
    the vision side is left out (SPHINX-MoE's extra encoders are not built here yet)."""
    path = Path(path)
    llama_type = _read_json(path / "meta.json").get("llama_type")
    if llama_type not in SUPPORTED:
        raise CheckpointError(f"{path}: llama_type {llama_type!r} is not supported (supported: {sorted(SUPPORTED)})")
    cfg = llm_config(_read_json(path / "config.json"))
    with torch.device("meta"):
        llm = M.Transformer(cfg)
    triples = (((target[0][len("llm."):], target[1]), src, t)
               for target, src, t in to_our_names(merged_tensors(shard_files(path), cfg.n_experts), cfg)
               if LLM_PART.match(src))                                 # the vision side is not read here
    return _load_renamed(llm, triples, dtype=dtype, device=device, where=f"{path} ({llama_type}, LLM)")


# ----------------------------------------------------------------------------- writing

def reference_args(cfg: M.ModelConfig) -> dict:
    """ModelArgs for config.json whose derived FFN width is ours."""
    hidden = int(2 * (4 * cfg.dim) / 3)
    args = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "multiple_of": cfg.ffn_dim, "ffn_dim_multiplier": None,
            "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "max_batch_size": 32,
            "max_seq_len": cfg.max_seq_len, "rope_scaling": None, "load_pretrained_visual_encoder": False,
            "trainable_mode": "mm_stage2"}
    if hidden > cfg.ffn_dim:                       # narrower than LLaMA's 8/3: express it as a multiplier
        args.update(multiple_of=1, ffn_dim_multiplier=(cfg.ffn_dim + 0.5) / hidden)
    assert reference_ffn_dim(args) == cfg.ffn_dim
    return args


def from_our_names(model: M.Sphinx):
    """Our state -> (reference name without `llma.`, tensor)."""
    cfg = model.cfg.llm
    back = {v: k for k, v in OURS.items()}
    inverse = {ours: (ref, layout_rules(layout, reverse=True)) for ref, (ours, layout) in ENCODERS.items()}
    dim = cfg.dim
    for name, t in unique_state_dict(model).items():
        if name.startswith("llm."):
            ref = name[len("llm."):]
            if ref.endswith("attention.wq.weight"):
                t = rope_rows(t, cfg.n_heads, to_ours=False)
            elif ref.endswith("attention.wk.weight"):
                t = rope_rows(t, cfg.n_kv_heads, to_ours=False)
            yield ref, t
        elif name in back:
            yield back[name], t.reshape(1, 1, dim) if name in ("begin_of_image", "end_of_image") else t
        elif name != "skip_token":            # no place for it: the reference encodes every sub-image
            ours = next((p for p in inverse if name.startswith(p)), None)
            if ours is None:
                raise CheckpointError(f"{name}: no reference name for it")
            ref, rules = inverse[ours]
            target = map_name(name[len(ours):], rules)
            if target is None:
                raise CheckpointError(f"{name}: no reference name for it")
            if ref == "clip.visual." and target[0] in ("class_embedding", "positional_embedding"):
                t = t.reshape(-1, t.shape[-1]).squeeze(0)          # open_clip's (d,) and (T, d)
            yield ref + target[0], t


def export_released(model: M.Sphinx, path, shards: int = 1, tokenizer_model=None):
    """Write our model in the released layout, split over `shards` model-parallel files, so the reference
    code can load it. Written into a temporary directory renamed into place: never half a checkpoint."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} exists; export into a new directory")
    cfg = model.cfg.llm
    if cfg.n_experts or cfg.tie_embeddings:
        raise CheckpointError("export: llama_ens5_light is a dense LLM with untied embeddings")
    for name, n in (("heads", cfg.n_heads), ("kv heads", cfg.n_kv_heads), ("FFN width", cfg.ffn_dim),
                    ("vocabulary", cfg.vocab_size), ("dim", cfg.dim)):
        if n % shards:
            raise CheckpointError(f"export: {name} ({n}) do not split over {shards} shards")
    parts = [{} for _ in range(shards)]
    for name, t in from_our_names(model):
        d = split_dim(name) if LLM_PART.match(name) else None
        pieces = t.chunk(shards, dim=d) if d is not None else [t] * shards
        for sd, piece in zip(parts, pieces):
            sd["llma." + name] = piece.detach().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(tmp, 0o777 & ~current_umask())          # mkdtemp makes it private (0700)
    for r, sd in enumerate(parts):
        torch.save({"model": sd}, tmp / f"consolidated.{r:02d}-of-{shards:02d}.model.pth")
    (tmp / "config.json").write_text(json.dumps(reference_args(cfg), indent=2))
    (tmp / "meta.json").write_text(json.dumps({"llama_type": "llama_ens5_light"}))
    if tokenizer_model:
        (tmp / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    os.replace(tmp, path)
