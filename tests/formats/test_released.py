"""released.py: LLaMA2-Accessory's consolidated checkpoints, read and written, against an independent
float64 forward in the reference's own (Meta) layout."""
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
import formats.released as R
import formats.released_vision as RV
import sample as S
import train as T
import vision as V
from checkpoint import CheckpointError, unique_state_dict

# A toy SPHINX-X: GQA LLM, the tiny encoders, no skip tokens (the released models have none).
LLM = M.ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=176, max_seq_len=2048)
# Encoders whose grids agree on the reference path: ConvNeXt 512 / 32 = 16 = DINOv2 224 / 14.
CFG = M.SphinxConfig(LLM, V.ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), input_size=None),
                     V.ViTConfig(dim=32, depth=1, heads=4, patch=14, pos_grid=4, ffn="mlp", pos_interp="dinov2"),
                     canvas=1024, grid=2, skip_tokens=False)


def released_mov(cfg, **extra):
    """The released models' image path (formats/released_vision.py) for a config, as load_released builds it."""
    return lambda: RV.ReleasedMoV(cfg.convnext, cfg.vit, cfg.llm.dim, **extra)


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    model = M.build_sphinx(CFG, mov=released_mov(CFG))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "attention_norm.weight", "ffn_norm.weight")):
                p.add_(0.3 * torch.randn_like(p))             # norms away from 1: a misplaced one shows
    return model


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    R.export_released(ours, root / "mp1", shards=1)
    R.export_released(ours, root / "mp2", shards=2)
    return root


def _shard(path, r=0, n=1):
    return torch.load(path / f"consolidated.{r:02d}-of-{n:02d}.model.pth", weights_only=True)["model"]


def reference_names(cfg) -> dict:
    """Names and shapes as the reference modules define them, without the `llma.` prefix:
    accessory/model/LLM/llama_ens5_light.py (Transformer, Attention, FeedForward, visual_proj,
    start_img/end_img), timm convnext.py (stem, stages.N.downsample, blocks' conv_dw/norm/mlp/gamma,
    head.norm) and DINOv2's vision_transformer.py (patch_embed.proj, cls_token, pos_embed, mask_token,
    blocks' norm1/attn.qkv/attn.proj/ls1.gamma/norm2/mlp/ls2.gamma, norm)."""
    L, d, hd = cfg.llm, cfg.llm.dim, cfg.llm.head_dim
    out = {"tok_embeddings.weight": (L.vocab_size, d), "norm.weight": (d,), "output.weight": (L.vocab_size, d),
           "visual_proj.0.weight": (d, cfg.convnext.dims[-1] + cfg.vit.dim), "visual_proj.0.bias": (d,),
           "visual_proj.1.weight": (d,), "visual_proj.1.bias": (d,), "start_img": (1, 1, d), "end_img": (1, 1, d)}
    for i in range(L.n_layers):
        p = f"layers.{i}."
        out.update({p + "attention.wq.weight": (L.n_heads * hd, d), p + "attention.wk.weight": (L.n_kv_heads * hd, d),
                    p + "attention.wv.weight": (L.n_kv_heads * hd, d), p + "attention.wo.weight": (d, L.n_heads * hd),
                    p + "feed_forward.w1.weight": (L.ffn_dim, d), p + "feed_forward.w3.weight": (L.ffn_dim, d),
                    p + "feed_forward.w2.weight": (d, L.ffn_dim), p + "attention_norm.weight": (d,),
                    p + "ffn_norm.weight": (d,)})
    cn, c = "openclip_convnext_xxl.", cfg.convnext
    out.update({cn + "stem.0.weight": (c.dims[0], 3, 4, 4), cn + "stem.0.bias": (c.dims[0],),
                cn + "stem.1.weight": (c.dims[0],), cn + "stem.1.bias": (c.dims[0],),
                cn + "head.norm.weight": (c.dims[-1],), cn + "head.norm.bias": (c.dims[-1],)})
    for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
        s = f"{cn}stages.{i}."
        if i:
            out.update({s + "downsample.0.weight": (c.dims[i - 1],), s + "downsample.0.bias": (c.dims[i - 1],),
                        s + "downsample.1.weight": (dim, c.dims[i - 1], 2, 2), s + "downsample.1.bias": (dim,)})
        for j in range(depth):
            b = f"{s}blocks.{j}."
            out.update({b + "conv_dw.weight": (dim, 1, 7, 7), b + "conv_dw.bias": (dim,), b + "norm.weight": (dim,),
                        b + "norm.bias": (dim,), b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                        b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "gamma": (dim,)})
    vt, v = "dinov2_vitg14.", cfg.vit
    out.update({vt + "patch_embed.proj.weight": (v.dim, 3, v.patch, v.patch), vt + "patch_embed.proj.bias": (v.dim,),
                vt + "cls_token": (1, 1, v.dim), vt + "pos_embed": (1, 1 + v.pos_grid ** 2, v.dim),
                vt + "mask_token": (1, v.dim), vt + "norm.weight": (v.dim,), vt + "norm.bias": (v.dim,)})
    for j in range(v.depth):
        b = f"{vt}blocks.{j}."
        for n, shape in (("norm1", (v.dim,)), ("norm2", (v.dim,)), ("attn.qkv", (3 * v.dim, v.dim)),
                         ("attn.proj", (v.dim, v.dim)), ("mlp.fc1", (v.hidden, v.dim)), ("mlp.fc2", (v.dim, v.hidden))):
            out[f"{b}{n}.weight"] = shape
            out[f"{b}{n}.bias"] = (shape[0],)
        out[b + "ls1.gamma"] = (v.dim,)
        out[b + "ls2.gamma"] = (v.dim,)
    return out


def meta_forward(sd: dict, args: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Text-only logits, float64, straight from reference-layout tensors as llama.py computes them:
    RoPE on adjacent pairs (complex multiplication), k/v heads repeated (repeat_kv), SwiGLU."""
    d, H, KV = args["dim"], args["n_heads"], args["n_kv_heads"]
    hd, T = d // H, len(tokens)
    g = lambda k: sd["llma." + k].double()
    inv = 1.0 / args["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), inv))
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args["norm_eps"]) * w

    def rope(x):
        c = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(c * cis[:, None]).reshape(x.shape)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    x = g("tok_embeddings.weight")[tokens]
    for i in range(args["n_layers"]):
        p = f"layers.{i}."
        h = rms(x, g(p + "attention_norm.weight"))
        q = rope((h @ g(p + "attention.wq.weight").T).view(T, H, hd))
        k = rope((h @ g(p + "attention.wk.weight").T).view(T, KV, hd)).repeat_interleave(H // KV, 1)
        v = (h @ g(p + "attention.wv.weight").T).view(T, KV, hd).repeat_interleave(H // KV, 1)
        a = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + mask, -1)
        x = x + torch.einsum("hqk,khd->qhd", a, v).reshape(T, d) @ g(p + "attention.wo.weight").T
        h = rms(x, g(p + "ffn_norm.weight"))
        if "moe_fn" in args:
            x = x + args["moe_fn"](i, h)
            continue
        x = x + (F.silu(h @ g(p + "feed_forward.w1.weight").T) * (h @ g(p + "feed_forward.w3.weight").T)) \
            @ g(p + "feed_forward.w2.weight").T
    return rms(x, g("norm.weight")) @ g("output.weight").T


def test_export_writes_exactly_the_reference_names_and_shapes(exported):
    sd = _shard(exported / "mp1")
    want = {"llma." + k: v for k, v in reference_names(CFG).items()}
    assert {k: tuple(t.shape) for k, t in sd.items()} == want
    args = json.loads((exported / "mp1" / "config.json").read_text())
    assert R.reference_ffn_dim(args) == LLM.ffn_dim and json.loads((exported / "mp1" / "meta.json").read_text()) == \
        {"llama_type": "llama_ens5_light"}


def test_reference_layout_logits_match_ours_after_loading(ours, exported):
    # The independent oracle reads the exported tensors the way the reference does (pairwise RoPE);
    # our model loaded from them must compute the same logits (and so must the original).
    sd = _shard(exported / "mp1")
    args = json.loads((exported / "mp1" / "config.json").read_text())
    tokens = torch.randint(0, LLM.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    want = meta_forward(sd, args, tokens)
    loaded = R.load_released(exported / "mp1", CFG)
    with torch.no_grad():
        for m in (loaded, ours):
            got = m.llm(tokens[None])[0][0].double()
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert not loaded.cfg.skip_tokens


def test_one_and_two_shards_load_identically_and_round_trip_bit_for_bit(ours, exported):
    a, b = _shard(exported / "mp2", 0, 2), _shard(exported / "mp2", 1, 2)
    wq = "llma.layers.0.attention.wq.weight"
    assert a[wq].shape[0] == LLM.n_heads * LLM.head_dim // 2                      # really split (column: dim 0)
    assert a["llma.tok_embeddings.weight"].shape[1] == LLM.dim // 2               # ParallelEmbedding: dim 1
    assert a["llma.layers.1.attention.wo.weight"].shape[1] == LLM.dim // 2        # row-parallel: dim 1
    assert torch.equal(a["llma.visual_proj.0.weight"], b["llma.visual_proj.0.weight"])   # replicated
    want = unique_state_dict(ours)
    for mp in ("mp1", "mp2"):
        got = unique_state_dict(R.load_released(exported / mp, CFG))
        assert got.keys() == want.keys()
        for k in want:
            if k != "skip_token":                       # never in the released layout
                assert torch.equal(got[k], want[k]), (mp, k)


def test_reference_args_reproduce_any_ffn_width():
    for dim, ffn in ((64, 176), (64, 96), (2048, 5632), (4096, 11008), (5120, 13824)):
        args = R.reference_args(replace(LLM, dim=dim, ffn_dim=ffn, n_heads=4, n_kv_heads=4))
        assert R.reference_ffn_dim(args) == ffn
    # LLaMA-2-13B as the reference writes it: multiple_of 256, no multiplier.
    assert R.reference_ffn_dim({"dim": 5120, "multiple_of": 256}) == 13824


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned-by-pickle",)


def test_hostile_directories_fail_with_one_clear_error(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = _copy(exported / "mp2", tmp_path / "missing")
    (bad / "consolidated.01-of-02.model.pth").unlink()
    with pytest.raises(CheckpointError, match=r"2 model-parallel shards expected, missing rank\(s\) \[1\]"):
        R.load_released(bad, CFG)
    bad = _copy(exported / "mp2", tmp_path / "mixed")
    (bad / "consolidated.00-of-03.model.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="several model-parallel sizes"):
        R.load_released(bad, CFG)
    bad = _copy(exported / "mp1", tmp_path / "extra")
    sd = _shard(bad)
    sd["llma.extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, bad / "consolidated.00-of-01.model.pth")
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra.weight"):
        R.load_released(bad, CFG)
    bad = _copy(exported / "mp1", tmp_path / "evil")
    torch.save({"model": {"llma.norm.weight": _Evil()}}, bad / "consolidated.00-of-01.model.pth")
    with pytest.raises(CheckpointError, match="refused, not a plain tensor file"):
        R.load_released(bad, CFG)
    assert not (tmp_path / "pwned-by-pickle").exists()
    bad = _copy(exported / "mp1", tmp_path / "moe")
    (bad / "meta.json").write_text(json.dumps({"llama_type": "mixtral_sparse_ens5"}))
    with pytest.raises(CheckpointError, match=r"does not fit the model:\n  missing \(\d+\): mov.clip."):
        R.load_released(bad, CFG)                       # a dense model's files under SPHINX-MoE's name
    (bad / "meta.json").write_text(json.dumps({"llama_type": "llama_ens7"}))
    with pytest.raises(CheckpointError, match="llama_type 'llama_ens7' is not supported"):
        R.load_released(bad, CFG)
    with pytest.raises(CheckpointError, match="exists; export into a new directory"):
        R.export_released(R.load_released(exported / "mp1", CFG), exported / "mp1")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    D.train_tokenizer(T.tokenizer_corpus(0, 128, n=200), LLM.vocab_size, path)
    return str(path)


def test_sample_answers_from_a_released_directory(exported, tokenizer, tmp_path, capsys, monkeypatch):
    from PIL import Image
    # A released directory gets the paper's vision side (sphinx-tiny's); here that is the toy's.
    monkeypatch.setitem(M.SIZES, "sphinx-tiny", lambda: CFG)
    Image.new("RGB", (90, 40), (20, 200, 30)).save(tmp_path / "photo.png")
    rc = S.main([str(tmp_path / "photo.png"), "What is this?", "--ckpt", str(exported / "mp2"), "--tokenizer", tokenizer,
                 "--max-new-tokens", "5", "--temperature", "0"])
    assert rc == 0 and "error" not in capsys.readouterr().err


def test_train_starts_from_a_released_directory(exported, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(M.SIZES, "toy", lambda: CFG)
    argv = ["--size", "toy", "--init", str(exported / "mp1"), "--tokenizer", tokenizer, "--steps", "2", "--batch", "2",
            "--micro-batch", "1", "--max-len", "1600", "--eval-per-task", "0", "--out", str(tmp_path / "run")]
    res = T.train(T.parse_args(argv))
    assert len(res["losses"]) == 2 and all(l == l for l in res["losses"])
    monkeypatch.setitem(M.SIZES, "toy", lambda: replace(CFG, llm=replace(LLM, n_layers=3)))
    with pytest.raises(CheckpointError, match="its LLM .* is not --size toy's"):
        T.train(T.parse_args(argv[:-1] + [str(tmp_path / "run2")]))


# ----------------------------------------------------------------------------- mixtral_sparse_ens5 (SPHINX-MoE)

MOE_ARGS = {"dim": 64, "hidden_dim": 48, "head_dim": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "vocab_size": 96, "norm_eps": 1e-5, "rope_theta": 1e6, "max_seq_len": 128,
            "moe": {"num_experts_per_tok": 2, "num_experts": 4}}


def _moe_reference_state(seed=0, a=MOE_ARGS) -> dict:
    """Random tensors with the names and shapes mixtral_sparse_ens5.py defines (MoE w1/w2/w3 are bare
    Parameters of shape (E * H, dim), `gate` a Linear (E, dim)), plus vision keys the LLM loader must skip."""
    g = torch.Generator().manual_seed(seed)
    E, H = a["moe"]["num_experts"], a["hidden_dim"]
    d, hd = a["dim"], a["dim"] // a["n_heads"]
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)
    sd = {"tok_embeddings.weight": r(a["vocab_size"], d), "norm.weight": 1 + r(d), "output.weight": r(a["vocab_size"], d),
          "visual_proj.0.weight": r(d, 8), "qformer_proj.0.weight": r(d, 8), "clip.visual.conv1.weight": r(4, 3, 2, 2)}
    for i in range(a["n_layers"]):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": r(a["n_heads"] * hd, d), p + "attention.wk.weight": r(a["n_kv_heads"] * hd, d),
                   p + "attention.wv.weight": r(a["n_kv_heads"] * hd, d), p + "attention.wo.weight": r(d, a["n_heads"] * hd),
                   p + "feed_forward.w1": r(E * H, d), p + "feed_forward.w2": r(E * H, d), p + "feed_forward.w3": r(E * H, d),
                   p + "feed_forward.gate.weight": r(E, d), p + "attention_norm.weight": 1 + r(d), p + "ffn_norm.weight": 1 + r(d)})
    return sd


def _write_moe(sd: dict, path, shards: int, args=MOE_ARGS):
    """Shards by tensor_parallel.py's rules and mixtral_sparse_ens5's _sparse_expert_split."""
    path.mkdir()
    E = MOE_ARGS["moe"]["num_experts"]
    parts = [{} for _ in range(shards)]
    for k, t in sd.items():
        if k.endswith(("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")):
            pieces = [c.reshape(-1, t.shape[-1]) for c in t.view(E, -1, t.shape[-1]).chunk(shards, dim=1)]
        elif R.split_dim(k) is not None:
            pieces = t.chunk(shards, dim=R.split_dim(k))
        else:
            pieces = [t] * shards
        for p, piece in zip(parts, pieces):
            p["llma." + k] = piece.clone()
    for i, p in enumerate(parts):
        torch.save({"model": p}, path / f"consolidated.{i:02d}-of-{shards:02d}.model.pth")
    (path / "config.json").write_text(json.dumps(args))
    (path / "meta.json").write_text(json.dumps({"llama_type": "mixtral_sparse_ens5"}))
    return path


def meta_moe_forward(sd: dict, tokens) -> torch.Tensor:
    """As meta_forward, with mixtral_sparse_ens5's MoE: softmax over all experts, top-2, renormalised,
    expert e = silu(x @ w1_e.T) * (x @ w3_e.T) @ w2_e with w2_e used untransposed."""
    a, E = MOE_ARGS, MOE_ARGS["moe"]["num_experts"]
    dense = dict(sd)
    ffn = {}
    for i in range(a["n_layers"]):
        p = f"layers.{i}.feed_forward."
        ffn[i] = {w: dense.pop(p + w).double().view(E, a["hidden_dim"], a["dim"]) for w in ("w1", "w2", "w3")}
        ffn[i]["gate"] = dense.pop(p + "gate.weight").double()

    def moe(i, h):
        f = ffn[i]
        probs = torch.softmax(h @ f["gate"].T, -1)
        w, sel = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for k in range(2):
                e = sel[t, k]
                out[t] += w[t, k] * (F.silu(h[t] @ f["w1"][e].T) * (h[t] @ f["w3"][e].T)) @ f["w2"][e]
        return out
    return meta_forward({"llma." + k: v for k, v in dense.items()}, {**a, "moe_fn": moe}, tokens)


def test_sparse_moe_llm_loads_from_one_and_two_shards_and_matches_the_reference_computation(tmp_path):
    sd = _moe_reference_state()
    tokens = torch.randint(0, MOE_ARGS["vocab_size"], (19,), generator=torch.Generator().manual_seed(3))
    want = meta_moe_forward(sd, tokens)
    got = {}
    for n in (1, 2):
        llm = R.load_released_llm(_write_moe(sd, tmp_path / f"mp{n}", n))
        assert llm.cfg.n_experts == 4 and llm.cfg.ffn_dim == 48
        with torch.no_grad():
            got[n] = llm(tokens[None])[0][0].double()
        torch.testing.assert_close(got[n], want, atol=2e-5, rtol=1e-5)
    assert torch.equal(got[1], got[2])


# ----------------------------------------------------------------------------- SPHINX-MoE-1k: four encoders

MOE1K_ARGS = {**MOE_ARGS, "vocab_size": LLM.vocab_size, "max_seq_len": 2048}
MOE1K = replace(CFG, llm=R.llm_config(MOE1K_ARGS))
MOE1K_EXTRA = dict(clip=V.ViTConfig(dim=16, depth=1, heads=2, patch=14, pos_grid=16, eps=1e-5, **RV.CLIP_VIT),
                   qformer=RV.QFormerConfig(vision=V.ViTConfig(dim=16, depth=1, heads=2, patch=14, pos_grid=16, ffn="mlp",
                                                               mlp_hidden=24, layer_scale=False, mask_token=False),
                                            dim=8, depth=2, heads=2, hidden=16, queries=3))


def test_sphinx_moe_1k_loads_four_encoders_and_computes_the_reference_image_path(tokenizer, tmp_path, monkeypatch,
                                                                                  capsys):
    """mixtral_sparse_ens5 at toy size, in the reference's layout: the MoE LLM, ConvNeXt, DINOv2, CLIP ViT
    (clip.visual.*, with the text side open_clip keeps) and a Blip2Model (qformer.*, older q_bias /
    v_bias), visual_proj over 5632-like concatenated channels and qformer_proj; then the image path
    transcribed from the reference's encode_image, and sample.py end to end."""
    torch.manual_seed(5)
    toy = M.build_sphinx(MOE1K, mov=released_mov(MOE1K, **MOE1K_EXTRA))
    monkeypatch.setattr(R, "MOE1K_ENCODERS", MOE1K_EXTRA)   # the toy's CLIP ViT and Q-Former
    with torch.no_grad():
        for n, p in toy.named_parameters():
            if not n.startswith("llm."):
                p.add_(0.05 * torch.randn_like(p))              # biases and norms away from their init
        for b in toy.mov.qformer.vision.blocks:                  # BLIP-2 never learnt a key bias
            b.qkv.bias[16:32] = 0
    sd = {k: v for k, v in _moe_reference_state(1, MOE1K_ARGS).items() if R.LLM_PART.match(k)}
    sd |= {k: v for k, v in R.from_our_names(toy) if not R.LLM_PART.match(k)}
    for k in [k for k in sd if k.endswith("self_attn.qkv.bias")]:   # as an older transformers saved it
        q, _, v = sd.pop(k).chunk(3)
        sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q, v
    sd |= {"clip.token_embedding.weight": torch.randn(10, 16), "clip.ln_final.weight": torch.ones(16),
           "clip.logit_scale": torch.ones(()), "clip.visual.proj": torch.randn(16, 8)}   # kept, never used
    assert sd["clip.visual.class_embedding"].shape == (16,) and sd["clip.visual.positional_embedding"].shape == (257, 16)
    models = [R.load_released(_write_moe(sd, tmp_path / f"mp{n}", n, MOE1K_ARGS), MOE1K) for n in (1, 2)]
    want_sd = toy.state_dict()
    for got in models:
        got_sd = got.state_dict()
        for k, v in want_sd.items():
            if not k.startswith("llm.") and k != "skip_token":
                assert torch.equal(got_sd[k], v), k
    m = models[1].mov
    assert m.proj[0].in_features == 16 + 32 + 32                  # CLIP + ConvNeXt + DINOv2 channels
    assert models[1].layout.block_len([False] * 5) == 5 * (3 + 257 + 2)    # (32 + 257 + 2) * 5 at full size
    # The reference's encode_image, written out: 224 views for the Q-Former, CLIP and DINOv2, 512 views for
    # the ConvNeXt; per view [qformer_proj(queries), visual_proj(cat(clip, convnext + gap cls, dinov2))].
    canvas = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    cm, cs, dm, ds = (torch.tensor(v).view(3, 1, 1) for v in (V.CLIP_MEAN, V.CLIP_STD, V.IMAGENET_MEAN, V.IMAGENET_STD))
    with torch.no_grad():
        x = (canvas - cm) / cs
        r = lambda size: F.interpolate(x.half(), size=(size, size), mode="bicubic").to(x.dtype)
        quads = lambda whole, y, s: torch.stack([whole, y[..., :s, :s], y[..., :s, s:], y[..., s:, :s], y[..., s:, s:]], 1)
        v224, v512 = quads(r(224), r(448), 224).flatten(0, 1), quads(r(512), x, 512).flatten(0, 1)
        conv = m.convnext(v512).flatten(-2).permute(0, 2, 1)
        conv = torch.cat([conv.mean(dim=1, keepdim=True), conv], dim=1)
        dino = m.vit((v224 * cs + cm - dm) / ds)
        ens = torch.cat([m.clip(v224), conv, dino], dim=2)
        want = torch.cat([m.qformer_proj(m.qformer(v224)), m.proj(ens)], dim=1)
        torch.testing.assert_close(m.reference_forward(canvas), want, atol=1e-5, rtol=0)
    # python sample.py photo "prompt" --ckpt <SPHINX-MoE-1k dir>
    from PIL import Image
    monkeypatch.setitem(M.SIZES, "sphinx-tiny", lambda: MOE1K)   # the released model's vision side, at toy size
    Image.new("RGB", (90, 40), (20, 200, 30)).save(tmp_path / "photo.png")
    rc = S.main([str(tmp_path / "photo.png"), "What is this?", "--ckpt", str(tmp_path / "mp2"), "--tokenizer",
                 tokenizer, "--max-new-tokens", "3", "--temperature", "0", "--dtype", "fp32"])
    assert rc == 0 and "error" not in capsys.readouterr().err
    # torchrun train.py --init <SPHINX-MoE-1k dir>: tuning starts from it (MoE LLM, four frozen encoders)
    monkeypatch.setitem(M.SIZES, "toy-moe-1k", lambda: MOE1K)
    res = T.train(T.parse_args(["--size", "toy-moe-1k", "--init", str(tmp_path / "mp1"), "--tokenizer", tokenizer,
                                "--steps", "2", "--batch", "2", "--micro-batch", "1", "--max-len", "1600",
                                "--eval-per-task", "0", "--dtype", "fp32", "--out", str(tmp_path / "run")]))
    assert len(res["losses"]) == 2 and all(l == l for l in res["losses"])
    trained = res["model"]
    assert not any(p.requires_grad for m in trained.mov.encoders() for p in m.parameters())
    assert trained.mov.qformer_proj[0].weight.requires_grad and trained.mov.proj[0].weight.requires_grad


def test_sphinx_moe_1k_full_size_shapes_on_the_meta_device():
    # What load_released builds for the real directory: visual_proj takes 1024 + 3072 + 1536 = 5632 channels,
    # qformer_proj 768, and each view is 32 + 257 positions between its tags.
    base = M.sphinx_config("sphinx-moe")
    cfg = replace(base, canvas=1024, skip_tokens=False)
    with torch.device("meta"):
        model = M.Sphinx(cfg, mov=RV.ReleasedMoV(cfg.convnext, cfg.vit, cfg.llm.dim, clip=RV.CLIP_VITL14,
                                                 qformer=RV.QFormerConfig()))
    assert model.mov.proj[0].in_features == 5632 and model.mov.qformer_proj[0].in_features == 768
    assert model.mov.proj[0].out_features == model.mov.qformer_proj[0].out_features == 4096
    assert model.layout.block_len([False] * 5) == (32 + 257 + 2) * 5       # the reference's image_words
