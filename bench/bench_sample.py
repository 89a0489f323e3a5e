"""Prefill and greedy decode on CPU: ours (KV cache) vs transformers' generate, same weights, one run.

    python bench/bench_sample.py          # tiny LLM and a mid size (d=1024, 8 layers), fp32
"""
import tempfile

from common import copy_bandwidth, keep_freed_memory, machine, table, timeit

import torch
import transformers

import model as M

keep_freed_memory()
PROMPT, NEW = 128, 64
SIZES = {
    "tiny (d=256, 4 layers, vocab 2048)": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                               num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
    "mid (d=1024, 8 layers, vocab 32000)": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16),
}
bw = copy_bandwidth()
print(f"prompt {PROMPT} tokens, {NEW} new tokens, greedy, batch 1, fp32; {machine()}; memory copy bandwidth {bw / 1e9:.1f} GB/s")
rows = []
for name, kw in SIZES.items():
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=1024, **kw)).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = M.load_hf(d).eval()
    prompt = torch.randint(0, kw["vocab_size"], (1, PROMPT))

    def hf(n):
        return ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, PROMPT:].tolist()

    def mine(n):
        return list(M.generate(ours, prompt[0].tolist(), None, n))

    with torch.no_grad():
        assert hf(NEW) == mine(NEW), f"{name}: greedy tokens differ"
        t_hf1, t_our1 = timeit(lambda: hf(1), repeat=5), timeit(lambda: mine(1), repeat=5)
        t_hfN, t_ourN = timeit(lambda: hf(NEW), warmup=1, repeat=3), timeit(lambda: mine(NEW), warmup=1, repeat=3)
    dec_hf, dec_our = (NEW - 1) / (t_hfN - t_hf1), (NEW - 1) / (t_ourN - t_our1)
    # bytes of weights read per decoded token: every matrix (the tied or untied head included)
    weight_bytes = 4 * sum(p.numel() for n, p in ours.named_parameters() if n != "tok_embeddings.weight")
    weight_bytes += 4 * ours.cfg.vocab_size * ours.cfg.dim if ours.cfg.tie_embeddings else 0
    for impl, t1, dec in (("transformers generate", t_hf1, dec_hf), ("ours", t_our1, dec_our)):
        rows.append([name, impl, f"{t1 * 1e3:.1f}", f"{t_hf1 / t1:.2f}x", f"{dec:.0f}", f"{dec / dec_hf:.2f}x",
                     f"{weight_bytes * dec / 1e9:.1f} GB/s ({weight_bytes * dec / bw:.0%})"])
print(table(rows, ["size", "implementation", "prefill ms", "prefill vs HF", "decode tokens/s", "decode vs HF",
                   "weight reads (of copy bw)"]))
