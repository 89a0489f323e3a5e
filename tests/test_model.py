"""model.py: the LLM against HF transformers (random weights) and against itself (KV cache), the Sphinx
sequence layout, skip tokens, sizes, and the dtype choice."""
import pytest
import torch

import formats.hf as HF
import loading as L
from formats.encoders import load_encoder
import model as M
from hf_oracles import make_hf_llama

transformers = pytest.importorskip("transformers")


def test_llama_parity_gqa_rope_theta(hf_llama):
    ref, path = hf_llama
    ours = HF.load_hf(path).eval()
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
    ours = HF.load_hf(path).eval()
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        a, _ = ours(tokens)
        b, _ = ours(embeds=ours.tok_embeddings(tokens))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


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


def test_sphinx_sizes():
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


def test_dynamic_ntk_rope_matches_transformers_past_the_trained_length(tmp_path):
    # InternLM2's published config scales RoPE dynamically (rope_scaling type "dynamic"); transformers
    # implements it for Llama, so a Llama with the same setting is the oracle. Trained length 16 here.
    ref = make_hf_llama(tmp_path, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 50000.0})
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, max_position_embeddings=16).eval()
    ref.save_pretrained(tmp_path)
    ours = HF.load_hf(tmp_path).eval()
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


def test_dtype_is_chosen_from_the_device_and_cpu_flags_or_as_asked(monkeypatch):
    """No timing: the same machine always picks the same precision, however busy it is."""
    yes, no = (lambda: True), (lambda: False)
    assert M.pick_dtype("auto", "cpu", has_bf16=yes) == ("bf16", "this CPU has bf16 matmul instructions")
    assert M.pick_dtype("auto", "cpu", has_bf16=no)[0] == "fp32"
    assert M.pick_dtype("fp32", "cpu", has_bf16=yes) == ("fp32", "as asked")
    assert M.pick_dtype("bf16", "cpu", has_bf16=no) == ("bf16", "as asked")
    assert M.pick_dtype("auto", "cuda", has_bf16=no) == ("bf16", "a GPU")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", no, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", yes, raising=False)
    assert M.cpu_has_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", no, raising=False)
    assert not M.cpu_has_bf16()


@pytest.mark.parametrize("macos14,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_dtype_on_mps_follows_what_torch_supports(monkeypatch, macos14, expected):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    never = lambda: pytest.fail("an Apple GPU's precision does not depend on the CPU")
    dtype, why = M.pick_dtype("auto", "mps", has_bf16=never)
    assert dtype == expected and "Apple GPU" in why
