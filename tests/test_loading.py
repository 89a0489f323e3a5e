"""loading.py: our formats and their atomic saves, and per-rank sharded loading under TP (our checkpoints
and HF directories)."""
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


def test_own_format_roundtrip_and_atomic_save(tmp_path, monkeypatch):
    torch.manual_seed(1)
    m = M.build(M.llm_config("tiny", n_layers=2, vocab_size=500))
    path = tmp_path / "llm.safetensors"
    L.save_llm(path, m)
    back = L.load_llm(path)
    assert back.cfg == m.cfg and back.output.weight is back.tok_embeddings.weight
    assert L.tensor_shape(path, "layers.1.attention.wq.weight") == list(m.layers[1].attention.wq.weight.shape)
    assert L.tensor_shape(path, "mov.proj.0.weight") is None and not L.base_has_projector(path)
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
