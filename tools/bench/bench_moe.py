"""One MoE layer, forward + backward on CPU: ours vs transformers' Mixtral sparse block vs a naive loop.

    python tools/bench/bench_moe.py                  # 8 experts, top-2, d=512, ffn=1024; 4096, 16 and 1 tokens; fp32
    python tools/bench/bench_moe.py --dtype bf16     # every implementation's weights and inputs in bf16

"ours (auto)" is what a model runs: moe_kernels.ExpertPathChooser's pick for the shape, timed once before the
measurement (the pick is printed); the "ours, path=..." rows show every CPU path it chose from.
Implementations are measured in turn, round after round, and each row is its median.
"""
import argparse

from common import copy_bandwidth, interleaved, keep_freed_memory, machine, matmul_peak_flops, table

import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moe
import moe_kernels

p = argparse.ArgumentParser()
p.add_argument("--experts", type=int, default=8)
p.add_argument("--top-k", type=int, default=2)
p.add_argument("--dim", type=int, default=512)
p.add_argument("--ffn", type=int, default=1024)
p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16, 1])
p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
args = p.parse_args()
keep_freed_memory()
torch.manual_seed(0)
E, k, d, H = args.experts, args.top_k, args.dim, args.ffn


class NaiveLoop(torch.nn.Module):
    """Per-expert loop over a boolean mask, the way most first MoE implementations look."""

    def __init__(self, ours):
        super().__init__()
        self.m = ours

    def forward(self, x):
        x2 = x.view(-1, d)
        _, w, idx = self.m.route(x2)
        out = torch.zeros_like(x2)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            h = x2[tok]
            y = (F.silu(h @ self.m.w1[e].T) * (h @ self.m.w3[e].T)) @ self.m.w2[e].T
            out = out.index_add(0, tok, y * w[tok, slot, None].to(y.dtype))
        return out.view_as(x)


def make_hf(impl):
    cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=H, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    return MixtralSparseMoeBlock(cfg)


dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
ours = moe.MoEFeedForward(d, H, E, k)
ours.init_weights(0.02)
torch.nn.init.normal_(ours.gate.weight, std=0.02)
impls = {}
for impl in ("eager", "grouped_mm"):
    hf = make_hf(impl)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.w1, ours.w3], 1))
        hf.experts.down_proj.copy_(ours.w2)
    impls[{"eager": "transformers MixtralSparseMoeBlock(config) (eager loop)",
           "grouped_mm": "transformers, experts_implementation=grouped_mm"}[impl]] = hf
impls["naive per-expert loop"] = NaiveLoop(ours)
impls["ours (auto)"] = ours
for path in moe_kernels.ExpertPathChooser.CANDIDATES:
    fixed = moe.MoEFeedForward(d, H, E, k)
    fixed.load_state_dict(ours.state_dict())
    fixed.path = path
    impls[f"ours, path={path}"] = fixed
for m in impls.values():
    m.to(dtype)

peak = matmul_peak_flops(dtype)
bw = copy_bandwidth()
print(f"MoE layer: {E} experts, top-{k}, d={d}, ffn={H}, {args.dtype}; {machine()}")
print(f"{args.dtype} matmul peak (2048^3): {peak / 1e9:.0f} GFLOP/s; memory copy bandwidth: {bw / 1e9:.1f} GB/s")
ref_name = "transformers MixtralSparseMoeBlock(config) (eager loop)"
gmm_name = "transformers, experts_implementation=grouped_mm"
for n in args.tokens:
    x = torch.randn(1, n, d, dtype=dtype)
    outs = {name: m(x) for name, m in impls.items()}
    for name, y in outs.items():
        assert torch.allclose(y, outs[ref_name], atol=1e-5 if dtype == torch.float32 else 2e-3), name
    rounds = 5 if n > 256 else 40
    xg, g = x.clone().requires_grad_(), torch.randn_like(x)

    def fwd(m):
        with torch.no_grad():
            m(x)

    def fwd_bwd(m):
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).backward(g)
    fwd(ours), fwd_bwd(ours)                     # the chooser times its candidates for both buckets here
    bucket = 1 << max(n * k - 1, 0).bit_length()
    picks = {grads: path for (rows, *_, grads), path in ours.chooser.best.items() if rows == bucket}
    t_f = interleaved({name: (lambda m=m: fwd(m)) for name, m in impls.items()}, rounds)
    t_fb = interleaved({name: (lambda m=m: fwd_bwd(m)) for name, m in impls.items()}, rounds)
    res = {name: (t_f[name], t_fb[name]) for name in impls}
    flops = 3 * 3 * 2 * n * k * d * H                      # fwd+bwd = 3 x forward; forward = 3 matmuls
    weight_bytes = 3 * min(E, n * k) * d * H * x.element_size()   # every busy expert's weights, read once
    t_ref_f, t_ref_fb = res[ref_name]
    t_gmm_f, t_gmm_fb = res[gmm_name]
    rows = []
    for name, (tf, tfb) in res.items():
        rows.append([name, f"{tf * 1e3:.2f}", f"{tfb * 1e3:.2f}", f"{t_ref_f / tf:.2f}x / {t_gmm_f / tf:.2f}x",
                     f"{t_ref_fb / tfb:.2f}x / {t_gmm_fb / tfb:.2f}x", f"{flops / tfb / peak:.0%}",
                     f"{weight_bytes / tf / bw:.0%}"])
    print(f"\n{n} tokens ({n * k} expert rows); ours (auto) picked {picks[False]} for the forward, {picks[True]} for fwd+bwd:")
    print(table(rows, ["implementation", "fwd ms", "fwd+bwd ms", "fwd vs eager / grouped_mm",
                       "fwd+bwd vs eager / grouped_mm", "fwd+bwd % of matmul peak", "fwd weight-read % of copy bw"]))
