"""loading.py: HF layouts (sharded, tied, InternLM2's packed wqkv and config), our formats and their atomic
saves, checkpoint errors that name the tensor, and per-rank sharded loading under TP."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import formats.hf as HF
import loading as L
from formats.encoders import load_encoder
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


def test_own_format_roundtrip_and_atomic_save(tmp_path, monkeypatch):
    torch.manual_seed(1)
    m = M.build(M.llm_config("tiny", n_layers=2, vocab_size=500))
    path = tmp_path / "llm.safetensors"
    L.save_llm(path, m)
    back = L.load_llm(path)
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
        L.save_llm(path, M.build(M.llm_config("tiny", n_layers=2, vocab_size=500)))
    assert list(tmp_path.iterdir()) == [path]
    again = L.load_llm(path)
    assert torch.equal(again.norm.weight, m.norm.weight)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(L.CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        L.load_llm(tmp_path / "junk.safetensors")


def test_sphinx_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    tiny_sphinx = M.build_sphinx(M.sphinx_config("tiny", llm=M.llm_config("tiny", n_layers=2)))
    path = tmp_path / "tiny.safetensors"
    L.save_sphinx(path, tiny_sphinx)
    back = L.load_sphinx(path, skip_tokens=False)
    assert not back.cfg.skip_tokens and back.cfg.llm == tiny_sphinx.cfg.llm
    for (k, a), (_, b) in zip(tiny_sphinx.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


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
    model = L.load_sphinx(ckpt, dtype=torch.bfloat16, tp_group=group)   # fp32 file -> private bf16 copies
    done.append(1)
    th.join()
    res = {"peak": peak[0], "params": sum(p.numel() * p.element_size() for p in model.parameters()),
           "wo": model.llm.layers[1].attention.wo.weight.clone(), "emb": model.llm.tok_embeddings.weight.clone()}
    res["hf"] = [HF.load_hf(d, tp_group=group).state_dict() for d in hf_dirs]
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
    L.save_sphinx(tmp_path / "big.safetensors", M.build_sphinx(cfg))           # ~100 MB, fp32
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
