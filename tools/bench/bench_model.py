"""LLM forward + backward tokens/s: ours vs transformers' LlamaForCausalLM, same weights, one run.

    python tools/bench/bench_model.py            # d=1024, 8 layers, 16 heads, seq 512, fp32, CPU
"""
import argparse
import tempfile

from common import keep_freed_memory, machine, matmul_peak_flops, table, timeit

import torch
import transformers

import formats.hf as hf

p = argparse.ArgumentParser()
p.add_argument("--dim", type=int, default=1024)
p.add_argument("--layers", type=int, default=8)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--kv-heads", type=int, default=16)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--repeat", type=int, default=5)
args = p.parse_args()
keep_freed_memory()
torch.manual_seed(0)

hf_cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=int(args.dim * 8 / 3 + 127) // 128 * 128,
                                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                  num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                  attn_implementation="sdpa")
ref = transformers.LlamaForCausalLM(hf_cfg).train()
with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    ours = hf.load_hf(d).train()

tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
targets = torch.roll(tokens, -1, 1)


def step_ours():
    ours.zero_grad(set_to_none=True)
    _, loss = ours(tokens, targets=targets)
    loss.backward()
    return loss


def step_ref():
    ref.zero_grad(set_to_none=True)
    out = ref(tokens, labels=tokens)
    out.loss.backward()
    return out.loss


with torch.no_grad():
    assert torch.allclose(ours(tokens)[0], ref(tokens).logits, atol=1e-4), "weights differ"
peak = matmul_peak_flops()
t_ref = timeit(step_ref, repeat=args.repeat)
t_ours = timeit(step_ours, repeat=args.repeat)
peak = max(peak, matmul_peak_flops())       # measured before and after: the higher is the machine's peak

cfg = ours.cfg
matmul_params = sum(p.numel() for n, p in ours.named_parameters() if n != "tok_embeddings.weight")
if cfg.tie_embeddings:
    matmul_params += cfg.vocab_size * cfg.dim
# 6 FLOPs per parameter per token (forward 2, backward 4) + causal attention (QK^T and AV: half of a full T^2 block).
flops_per_token = 6 * matmul_params + 6 * cfg.n_layers * args.seq * cfg.dim
ntok = args.batch * args.seq
rows = []
for name, t in (("transformers LlamaForCausalLM", t_ref), ("ours (model.py)", t_ours)):
    rows.append([name, f"{t * 1e3:.0f}", f"{ntok / t:.0f}", f"{flops_per_token * ntok / t / peak:.0%}", f"{t_ref / t:.2f}x"])
print(f"LLM forward+backward, d={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} seq={args.seq} batch={args.batch} "
      f"vocab={cfg.vocab_size} fp32; {machine()}; fp32 matmul peak (2048^3) {peak / 1e9:.0f} GFLOP/s")
print(table(rows, ["implementation", "ms/step", "tokens/s", "MFU vs peak", "speed vs transformers"]))
