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
