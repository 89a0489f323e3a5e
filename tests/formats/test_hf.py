"""formats/hf.py: HF layouts against transformers (sharded, tied, InternLM2's packed wqkv and its config),
checkpoint errors that name the tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import formats.hf as HF
import loading as L
import model as M
from hf_oracles import make_hf_llama

transformers = pytest.importorskip("transformers")


def test_sharded_and_tied(tmp_path):
    ref = make_hf_llama(tmp_path / "tied", tie=True, theta=10000.0, seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        expected = ref(tokens).logits
        for d in ("tied", "sharded"):
            ours = HF.load_hf(tmp_path / d).eval()
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
    ours = HF.load_hf(tmp_path / "internlm2").eval()
    tokens = torch.randint(0, 320, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0], ref(tokens).logits, atol=1e-4, rtol=0)


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
    with pytest.raises(L.CheckpointError, match=message):
        HF.load_hf(tmp_path)


def test_internlm2_config_with_dynamic_rope_scaling_loads():
    # The shape of InternLM2-7B's config.json (InternLM2's remote code reads rope_scaling {"type", "factor"}).
    hf = {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544, "intermediate_size": 14336,
          "rms_norm_eps": 1e-5, "rope_theta": 1000000, "max_position_embeddings": 32768,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    cfg, layout = HF.config_from_hf(hf)
    assert layout == "internlm2" and (cfg.rope_dynamic_factor, cfg.rope_original_max) == (2.0, 32768)
    assert M.rope_theta_at(cfg, 32768) == 1e6 and M.rope_theta_at(cfg, 65536) == pytest.approx(1e6 * 3 ** (128 / 126))
    with pytest.raises(L.CheckpointError, match="only dynamic NTK"):
        HF.config_from_hf(hf | {"rope_scaling": {"type": "yarn", "factor": 4.0}})
