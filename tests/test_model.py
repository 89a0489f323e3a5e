"""The LLM against HF transformers (random weights) and against itself (KV cache)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

transformers = pytest.importorskip("transformers")


def _randomise_norms(hf_model, gen):
    # HF initialises RMSNorm weights to 1, which would hide a norm applied in the wrong place.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def make_hf_llama(path, tie=False, theta=50000.0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, rope_theta=theta,
                                   max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-6, **kw)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    _randomise_norms(ref, torch.Generator().manual_seed(seed + 1))
    ref.save_pretrained(path)
    return ref


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return make_hf_llama(path), path


def test_llama_parity_gqa_rope_theta(hf_llama):
    ref, path = hf_llama
    ours = M.load_hf(path).eval()
    assert ours.cfg.n_kv_heads == 2 and ours.cfg.rope_theta == 50000.0
    tokens = torch.randint(0, 320, (3, 37))
    with torch.no_grad():
        expected = ref(tokens).logits
        got, _ = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The loss: HF shifts labels internally; ours takes already-shifted targets with an ignore index.
    labels = tokens.clone()
    labels[:, :5] = -100
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    with torch.no_grad():
        hf_loss = ref(tokens, labels=labels).loss
        _, loss = ours(tokens, targets=targets)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=0)


def test_embeds_input_equals_tokens(hf_llama):
    _, path = hf_llama
    ours = M.load_hf(path).eval()
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        a, _ = ours(tokens)
        b, _ = ours(embeds=ours.tok_embeddings(tokens))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sharded_and_tied(tmp_path):
    ref = make_hf_llama(tmp_path / "tied", tie=True, theta=10000.0, seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        expected = ref(tokens).logits
        for d in ("tied", "sharded"):
            ours = M.load_hf(tmp_path / d).eval()
            assert ours.output.weight is ours.tok_embeddings.weight
            torch.testing.assert_close(ours(tokens)[0], expected, atol=1e-4, rtol=0)


def pack_internlm2(llama_dir, out_dir):
    """Rewrite a HF Llama checkpoint in InternLM2's names and packed wqkv layout.

    InternLM2 packs per kv group g: [q heads of group g (n_heads/n_kv of them), k head g, v head g],
    each head_dim rows, so wqkv is (n_kv * (q_per_kv + 2) * head_dim, dim).
    """
    cfg = json.loads((llama_dir / "config.json").read_text())
    sd = load_file(str(llama_dir / "model.safetensors"))
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, g = D // H, H // KV
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(KV, g, hd, D)
        k = sd[p + "self_attn.k_proj.weight"].view(KV, 1, hd, D)
        v = sd[p + "self_attn.v_proj.weight"].view(KV, 1, hd, D)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, D).contiguous()
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out_dir.mkdir()
    save_file(out, str(out_dir / "model.safetensors"))
    icfg = {"architectures": ["InternLM2ForCausalLM"], "hidden_size": D, "num_hidden_layers": cfg["num_hidden_layers"],
            "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": cfg["vocab_size"],
            "intermediate_size": cfg["intermediate_size"], "rms_norm_eps": cfg["rms_norm_eps"],
            "rope_theta": cfg["rope_parameters"]["rope_theta"], "rope_scaling": None,
            "max_position_embeddings": cfg["max_position_embeddings"], "tie_word_embeddings": False, "bias": False}
    (out_dir / "config.json").write_text(json.dumps(icfg))


def test_internlm2_wqkv_unpacks_to_llama(hf_llama, tmp_path):
    ref, path = hf_llama
    pack_internlm2(path, tmp_path / "internlm2")
    ours = M.load_hf(tmp_path / "internlm2").eval()
    tokens = torch.randint(0, 320, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], ref(tokens).logits, atol=1e-4, rtol=0)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = M.build(M.llm_config("tiny", n_layers=2)).eval()
    tokens = torch.randint(0, m.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full, _ = m(tokens)
        m.setup_cache(batch=2, max_len=32)
        steps = [m(tokens[:, t:t + 1], start_pos=t)[0] for t in range(24)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        # A prefill chunk, then a chunk appended to the cache, then single tokens.
        m.setup_cache(batch=2, max_len=32)
        a, _ = m(embeds=m.tok_embeddings(tokens[:, :10]))
        b, _ = m(tokens[:, 10:17], start_pos=10)
        c = [m(tokens[:, t:t + 1], start_pos=t)[0] for t in range(17, 24)]
        torch.testing.assert_close(torch.cat([a, b, *c], 1), full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="KV cache holds 32"):
            m(tokens[:, :9], start_pos=28)
        m.clear_cache()


@pytest.mark.parametrize("name,expected", [("tinyllama-1.1b", 1_100_048_384), ("internlm2-7b", 7_737_708_544),
                                           ("llama2-13b", 13_015_864_320), ("mixtral-8x7b", 46_702_792_704)])
def test_paper_param_counts_on_meta(name, expected):
    m = M.build(M.llm_config(name), init=False)
    assert next(m.parameters()).is_meta
    assert M.count_params(m) == expected


def test_unknown_size_is_named():
    with pytest.raises(KeyError, match="unknown LLM size 'huge'.*tinyllama-1.1b"):
        M.llm_config("huge")


def _corrupt(path, edit):
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), r"missing \(1\): layers\.1\.feed_forward\.w3\.weight"),
    (lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
     r"unexpected \(1\): model\.layers\.0\.self_attn\.extra\.weight"),
    (lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}),
     r"wrong shape \(1\): model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint \(8, 64\) vs model \(16, 64\)"),
])
def test_bad_checkpoint_names_the_tensor(hf_llama, tmp_path, edit, message):
    ref, _ = hf_llama
    ref.save_pretrained(tmp_path)
    _corrupt(tmp_path, edit)
    with pytest.raises(M.CheckpointError, match=message):
        M.load_hf(tmp_path)


def test_own_format_roundtrip_and_atomic_save(tmp_path, monkeypatch):
    torch.manual_seed(1)
    m = M.build(M.llm_config("tiny", n_layers=2, vocab_size=500))
    path = tmp_path / "llm.safetensors"
    M.save_llm(path, m)
    back = M.load_llm(path)
    assert back.cfg == m.cfg and back.output.weight is back.tok_embeddings.weight
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # A crash in the middle of the next save leaves the previous checkpoint readable and unchanged.
    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        M.save_llm(path, M.build(M.llm_config("tiny", n_layers=2, vocab_size=500)))
    assert list(tmp_path.iterdir()) == [path]
    again = M.load_llm(path)
    assert torch.equal(again.norm.weight, m.norm.weight)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(M.CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        M.load_llm(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- the multimodal Sphinx model

from PIL import Image  # noqa: E402

import tiling as T  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sphinx():
    torch.manual_seed(0)
    return M.build_sphinx(M.sphinx_config("tiny", llm=M.llm_config("tiny", n_layers=2)))


def _photo(w, h, seed=0):
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.uint8).numpy())


def _count_encoder_views(model):
    seen = {"vit": 0, "convnext": 0}
    hooks = [getattr(model.mov, k).register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, seen[k] + len(i[0])))
             for k in seen]
    return seen, hooks


def test_skip_tokens_save_exactly_the_padded_views(tiny_sphinx):
    m = tiny_sphinx
    square, wide = T.tile(_photo(90, 90), 128, 2), T.tile(_photo(200, 100), 128, 2)
    per_view = m.mov.tokens_per_view(64) + 2
    assert m.image_cost(square) == {"views_encoded": 5, "skip_tokens": 0, "image_tokens": 5 * per_view}
    assert m.image_cost(wide) == {"views_encoded": 3, "skip_tokens": 2, "image_tokens": 3 * per_view + 2}
    tokens = torch.tensor([[1, 5, 6, 7]])
    for tiles, views in ((square, 5), (wide, 3)):
        seen, hooks = _count_encoder_views(m)
        with torch.no_grad():
            logits, _ = m(tokens, [tiles])
        [h.remove() for h in hooks]
        assert seen == {"vit": views, "convnext": views}
        assert logits.shape[1] == 4 + m.image_cost(tiles)["image_tokens"]
    off = M.build_sphinx(replace_cfg(m.cfg, skip_tokens=False), init=False)
    assert off.image_cost(wide) == {"views_encoded": 5, "skip_tokens": 0, "image_tokens": 5 * per_view}


def replace_cfg(cfg, **kw):
    from dataclasses import replace
    return replace(cfg, **kw)


def test_sequence_layout_bos_image_block_text(tiny_sphinx):
    m = tiny_sphinx
    wide = T.tile(_photo(200, 100), 128, 2)                     # views: global, s0, s1, skip, skip
    tokens = torch.tensor([[1, 11, 12, 13]])
    targets = torch.tensor([[11, 12, 13, -100]])
    with torch.no_grad():
        emb, tgt = m.embed(tokens, [wide], targets)
        feats = m.mov(wide.views[:3])
    n = m.mov.tokens_per_view(64)
    E = m.llm.tok_embeddings.weight
    assert torch.equal(emb[0, 0], E[1])
    pos = 1
    for v in range(3):
        assert torch.equal(emb[0, pos], m.begin_of_image)
        torch.testing.assert_close(emb[0, pos + 1: pos + 1 + n], feats[v])
        assert torch.equal(emb[0, pos + 1 + n], m.end_of_image)
        pos += n + 2
    assert torch.equal(emb[0, pos], m.skip_token) and torch.equal(emb[0, pos + 1], m.skip_token)
    assert torch.equal(emb[0, pos + 2:], E[[11, 12, 13]])
    assert (tgt[0, :pos + 1] == -100).all() and tgt[0, pos + 1].item() == 11
    assert tgt[0, pos + 2:].tolist() == [12, 13, -100]


def test_batch_mixes_images_and_text_only(tiny_sphinx):
    m = tiny_sphinx
    tiles = [T.tile(_photo(200, 100), 128, 2), None, T.tile(_photo(64, 64), 128, 2)]
    tokens = torch.randint(2, 100, (3, 6))
    tokens[:, 0] = 1
    with torch.no_grad():
        batched, _ = m(tokens, tiles)
        for b in range(3):
            single, _ = m(tokens[b:b + 1], [tiles[b]])
            L = single.shape[1]
            torch.testing.assert_close(batched[b, :L], single[0], atol=1e-4, rtol=0)   # right padding is harmless


def test_gradients_reach_projector_tags_skip_token_not_encoders(tiny_sphinx):
    m = tiny_sphinx
    m.zero_grad(set_to_none=True)
    tokens = torch.randint(2, 100, (2, 8))
    tokens[:, 0] = 1
    _, loss = m(tokens, [T.tile(_photo(200, 100), 128, 2), T.tile(_photo(70, 70), 128, 2)], torch.roll(tokens, -1, 1))
    loss.backward()
    for p in (m.mov.proj[0].weight, m.mov.proj[1].weight, m.begin_of_image, m.end_of_image, m.skip_token,
              m.llm.layers[0].attention.wq.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in [*m.mov.convnext.parameters(), *m.mov.vit.parameters()]:
        assert not p.requires_grad and p.grad is None
    m.zero_grad(set_to_none=True)


def test_sphinx_sizes_and_checkpoint_roundtrip(tiny_sphinx, tmp_path):
    # Paper sizes on the meta device: LLM + ConvNeXt-XXL + ViT-g + projector (Linear 4608->d with bias,
    # LayerNorm d) + three learnable vectors (begin/end of image, skip token).
    for name in ("sphinx-tiny", "sphinx-intern2", "sphinx-plus", "sphinx-plus-2k", "sphinx-moe"):
        cfg = M.sphinx_config(name)
        big = M.build_sphinx(cfg, init=False)
        d = cfg.llm.dim
        assert M.count_params(big) == M.count_params(big.llm) + 843_398_016 + 1_136_480_768 + 4608 * d + 3 * d + 3 * d
        assert big.mov.tokens_per_view(cfg.view_size) == 257
    assert M.count_params(M.build_sphinx(M.sphinx_config("tiny-moe"), init=False).llm) > 0
    assert M.sphinx_config("sphinx-plus-2k").grid == 3 and M.sphinx_config("sphinx-plus-2k").view_size == 224
    with pytest.raises(KeyError, match="unknown size 'sphinx-huge'"):
        M.sphinx_config("sphinx-huge")
    path = tmp_path / "tiny.safetensors"
    M.save_sphinx(path, tiny_sphinx)
    back = M.load_sphinx(path, skip_tokens=False)
    assert not back.cfg.skip_tokens and back.cfg.llm == tiny_sphinx.cfg.llm
    for (k, a), (_, b) in zip(tiny_sphinx.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_dynamic_ntk_rope_matches_transformers_past_the_trained_length(tmp_path):
    # InternLM2's published config scales RoPE dynamically (rope_scaling type "dynamic"); transformers
    # implements it for Llama, so a Llama with the same setting is the oracle. Trained length 16 here.
    ref = make_hf_llama(tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 50000.0})
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, max_position_embeddings=16).eval()
    ref.save_pretrained(tmp_path)
    ours = M.load_hf(tmp_path).eval()
    assert (ours.cfg.rope_dynamic_factor, ours.cfg.rope_original_max, ours.cfg.max_seq_len) == (2.0, 16, 32)
    for n in (12, 31):                                   # below (unchanged) and past the trained length
        tokens = torch.randint(0, 320, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens)[0], ref(tokens).logits, atol=1e-4, rtol=0)
    # Decoding with a KV cache crosses the threshold one token at a time, as transformers does.
    tokens = torch.randint(0, 320, (1, 28), generator=torch.Generator().manual_seed(5))
    ours.setup_cache(1, 32)
    with torch.no_grad():
        hf = ref(tokens[:, :10], use_cache=True)
        mine = ours(tokens[:, :10])[0]
        torch.testing.assert_close(mine, hf.logits, atol=1e-4, rtol=0)
        past = hf.past_key_values
        for p in range(10, 28):
            hf = ref(tokens[:, p:p + 1], past_key_values=past, use_cache=True)
            past = hf.past_key_values
            torch.testing.assert_close(ours.decode_step(tokens[:, p:p + 1], p), hf.logits, atol=1e-4, rtol=0)
    ours.clear_cache()


def test_internlm2_config_with_dynamic_rope_scaling_loads():
    # The shape of InternLM2-7B's config.json (InternLM2's remote code reads rope_scaling {"type", "factor"}).
    hf = {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544, "intermediate_size": 14336,
          "rms_norm_eps": 1e-5, "rope_theta": 1000000, "max_position_embeddings": 32768,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    cfg, layout = M.config_from_hf(hf)
    assert layout == "internlm2" and (cfg.rope_dynamic_factor, cfg.rope_original_max) == (2.0, 32768)
    assert M.rope_theta_at(cfg, 32768) == 1e6 and M.rope_theta_at(cfg, 65536) == pytest.approx(1e6 * 3 ** (128 / 126))
    with pytest.raises(M.CheckpointError, match="only dynamic NTK"):
        M.config_from_hf(hf | {"rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_loss_only_skips_the_vocabulary_projection_where_nothing_is_predicted():
    torch.manual_seed(0)
    m = M.build(M.ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64))
    tokens = torch.randint(0, 64, (2, 12))
    targets = torch.randint(0, 64, (2, 12))
    targets[:, :7] = -100
    targets[1, 9:] = -100
    full = m(tokens, targets=targets, loss_sum=True)[1]
    logits, part = m(tokens, targets=targets, loss_sum=True, loss_only=True)
    assert logits is None
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    full.backward()
    g_full = m.output.weight.grad.clone()
    m.zero_grad()
    m(tokens, targets=targets, loss_sum=True, loss_only=True)[1].backward()
    torch.testing.assert_close(m.output.weight.grad, g_full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- per-rank sharded loading

def _anon_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
    return 0


def _sharded_load_worker(rank, world, port, ckpt, hf_dirs, out):
    import ctypes
    import os
    import threading
    import time
    import torch.distributed as dist
    torch.set_num_threads(1)
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)      # big blocks go back to the OS when freed
    group = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    with torch.device("meta"):
        M.Transformer(M.llm_config("tiny"))            # one-time library set-up (~70 MB), not the load
    base, peak, done = _anon_bytes(), [0], []

    def poll():                                        # private memory, sampled while loading
        while not done:
            peak[0] = max(peak[0], _anon_bytes() - base)
            time.sleep(0.001)
    th = threading.Thread(target=poll)
    th.start()
    model = M.load_sphinx(ckpt, dtype=torch.bfloat16, tp_group=group)   # fp32 file -> private bf16 copies
    done.append(1)
    th.join()
    res = {"peak": peak[0], "params": sum(p.numel() * p.element_size() for p in model.parameters()),
           "wo": model.llm.layers[1].attention.wo.weight.clone(), "emb": model.llm.tok_embeddings.weight.clone()}
    res["hf"] = [M.load_hf(d, tp_group=group).state_dict() for d in hf_dirs]
    torch.save(res, f"{out}.{world}.{rank}")


def test_each_tp_rank_reads_only_its_shard(tmp_path):
    """Per-rank sharded loading: built on the meta device, each TP rank reads only its slices (our
    checkpoints; HF Llama and Mixtral directories): with TP=2 a rank's private memory while loading is
    half of one process's, and its tensors are exactly its shards of the full ones."""
    from dataclasses import replace
    from multiproc import free_port, spawn
    import parallel as P
    cfg = M.sphinx_config("tiny")
    cfg = replace(cfg, llm=replace(cfg.llm, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1536, vocab_size=8000))
    torch.manual_seed(0)
    M.save_sphinx(tmp_path / "big.safetensors", M.build_sphinx(cfg))           # ~100 MB, fp32
    make_hf_llama(tmp_path / "llama")
    torch.manual_seed(1)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(tmp_path / "mixtral")
    hf_dirs = [str(tmp_path / "llama"), str(tmp_path / "mixtral")]
    out = str(tmp_path / "r")
    for world in (1, 2):
        spawn(_sharded_load_worker, (world, free_port(), str(tmp_path / "big.safetensors"), hf_dirs, out), world,
              timeout=180)
    one = torch.load(f"{out}.1.0")
    two = [torch.load(f"{out}.2.{r}") for r in range(2)]
    assert one["params"] > 90 * 2**20 // 2                                    # bf16: ~50 MB of weights
    for r, res in enumerate(two):
        assert abs(res["params"] / one["params"] - 0.5) < 0.02
        assert res["peak"] < 0.6 * one["peak"], (res["peak"], one["peak"])     # about half, nothing full
        assert torch.equal(res["wo"], P.shard("llm.layers.1.attention.wo.weight", one["wo"], r, 2))
        assert torch.equal(res["emb"], P.shard("llm.tok_embeddings.weight", one["emb"], r, 2))
        for full, part in zip(one["hf"], res["hf"]):
            assert full.keys() == part.keys()
            for name in full:
                assert torch.equal(part[name], P.shard(name, full[name], r, 2)), name


def test_dtype_is_chosen_by_measurement_or_as_asked():
    fast_bf16 = lambda dt: 900e9 if dt == torch.bfloat16 else 215e9          # an AVX-512-BF16 CPU
    slow_bf16 = lambda dt: 1e9 if dt == torch.bfloat16 else 100e9            # an AVX2-only CPU
    near = lambda dt: 130e9 if dt == torch.bfloat16 else 100e9               # not clearly faster
    assert M.pick_dtype("auto", "cpu", fast_bf16) == ("bf16", "matmuls measured here: bf16 900 vs fp32 215 GFLOP/s")
    assert M.pick_dtype("auto", "cpu", slow_bf16)[0] == "fp32"
    assert M.pick_dtype("auto", "cpu", near)[0] == "fp32"
    assert M.pick_dtype("fp32", "cpu", fast_bf16) == ("fp32", "as asked")
    assert M.pick_dtype("bf16", "cpu", slow_bf16) == ("bf16", "as asked")
    assert M.pick_dtype("auto", "cuda", slow_bf16) == ("bf16", "a GPU")
    assert M.matmul_flops(torch.float32, 64) > 0
