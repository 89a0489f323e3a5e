"""Mixtral sparse Mixture-of-Experts FFN, as SPHINX-MoE uses it.

Router (replicated Linear(d, E)) -> softmax over all experts in fp32 -> top-k ->
renormalise the k weights -> tokens grouped by expert (sort, counts, offsets) ->
SwiGLU experts as grouped GEMMs -> weighted scatter back. Dropless: no capacity,
every token reaches its k experts. The Switch-style load-balancing loss is kept on
the module after each training forward.

The experts' weights are stacked per layer, w1/w3: (E, hidden, d), w2: (E, d, hidden),
so one grouped GEMM covers every expert. Under tensor parallelism each expert is
sharded along `hidden` (w1/w3 rows, w2 columns): the layer then returns a partial sum
that the caller all-reduces, exactly like the dense FFN.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer loss E / (N k) * dot(tokens_per_expert, mean_probs); 1.0 when balanced.

    probs: (N, E) router softmax; top_idx: (N, k) chosen experts.
    """
    N, k = top_idx.shape
    tokens_per_expert = torch.bincount(top_idx.flatten(), minlength=n_experts).to(probs.dtype)
    return n_experts / (N * k) * torch.dot(tokens_per_expert, probs.mean(0))


def group_by_expert(top_idx: torch.Tensor, n_experts: int):
    """Sort the N*k (token, expert) assignments by expert.

    Returns order (positions into the flattened (N, k) assignments, grouped by expert),
    counts per expert and the end offset of each expert's rows.
    """
    flat = top_idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    return order, counts, counts.cumsum(0)


def grouped_swiglu_torch(x, w1, w3, w2, offsets):
    """CPU path and reference. x: (M, d) rows grouped by expert; offsets: (E,) end of each group."""
    offs = offsets.to(torch.int32)
    h = F.silu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)) * torch._grouped_mm(x, w3.transpose(1, 2), offs=offs)
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)


def grouped_swiglu_loop(x, w1, w3, w2, offsets):
    """The same, one expert at a time: the plainest statement of what the kernels compute."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        xe = x[start:end]
        out.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w2.shape[1])


# ----------------------------------------------------------------------------- Triton grouped GEMM
#
# Two kernels cover the SwiGLU experts forward and backward:
#   _grouped_mm:    C[rows of e] (+)= A[rows of e] @ B[e]     one launch for all experts; a program
#                   owns a BLOCK_M tile of ONE expert's rows, so experts without tokens get no tiles.
#   _grouped_wgrad: C[e] = A[rows of e]^T @ B[rows of e]      weight gradients, one program per
#                   (expert, output tile), reducing over that expert's rows.
# B is addressed through strides, so W and W^T are the same tensor. Accumulation is fp32.

@triton.jit
def _grouped_mm(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, offsets_ptr, N, K,
                stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                ACCUMULATE: tl.constexpr, FP32_IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile)
    if e >= 0:                                   # the grid has spare tiles (an upper bound, no host sync)
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.load(offsets_ptr + e)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :] * stride_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + e * stride_be + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if FP32_IEEE:
                acc += tl.dot(a, b, input_precision="ieee")   # match torch's fp32 matmul (no TF32)
            else:
                acc += tl.dot(a, b)
        c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        mask = row_mask[:, None] & col_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad(a_ptr, b_ptr, c_ptr, offsets_ptr, P, Q,
                   stride_am, stride_ap, stride_bm, stride_bq, stride_ce, stride_cp, stride_cq,
                   FP32_IEEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    e, pid = tl.program_id(0), tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    ps = (pid // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):        # an expert with no rows writes zeros, nothing else
        m_mask = (m0 + ms) < end
        a = tl.load(a_ptr + (m0 + ms)[None, :] * stride_am + ps[:, None] * stride_ap,
                    mask=m_mask[None, :] & (ps[:, None] < P), other=0.0)            # (P, M): A^T tile
        b = tl.load(b_ptr + (m0 + ms)[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=m_mask[:, None] & (qs[None, :] < Q), other=0.0)            # (M, Q)
        if FP32_IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(c_ptr + e * stride_ce + ps[:, None] * stride_cp + qs[None, :] * stride_cq,
             acc.to(c_ptr.dtype.element_ty), mask=(ps[:, None] < P) & (qs[None, :] < Q))


def tile_sizes(device: torch.device) -> dict:
    """BLOCK_M/N/K and launch options. Hopper (see README for the arithmetic): 128 x 128 x 64 tiles,
    8 warps, 4 pipeline stages (4 x 32 KB of shared memory). The CPU interpreter runs every tile as
    a numpy matmul, so small tiles only cost time there."""
    if device.type == "cuda":
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


def _tile_table(offsets: torch.Tensor, M: int, block_m: int):
    """Per row tile of the grouped rows: its expert (-1 if spare) and first row. Built on the
    device with an upper bound on the tile count (cdiv(M, BM) + E), so no host sync is needed."""
    E = offsets.numel()
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    tiles = (offsets - starts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    t = torch.arange(triton.cdiv(M, block_m) + E, device=offsets.device)
    e = torch.searchsorted(cum, t, right=True)
    ec = e.clamp(max=E - 1)
    row = starts[ec] + (t - (cum[ec] - tiles[ec])) * block_m
    return torch.where(e < E, e, -1).to(torch.int32), row.to(torch.int32)


def grouped_mm(a, b_stack, offsets, table, out=None, transpose_b=False):
    """a (M, K) grouped rows @ per-expert b_stack[e] (K, N), or b_stack[e]^T if transpose_b."""
    tiles = tile_sizes(a.device)
    be, bk, bn = b_stack.stride()
    if transpose_b:
        bk, bn = bn, bk
    N = b_stack.shape[1] if transpose_b else b_stack.shape[2]
    accumulate = out is not None
    if out is None:
        out = a.new_empty(a.shape[0], N)
    tile_expert, tile_row = table
    grid = (tile_expert.numel(), triton.cdiv(N, tiles["BLOCK_N"]))
    _grouped_mm[grid](a, b_stack, out, tile_expert, tile_row, offsets, N, a.shape[1],
                      a.stride(0), a.stride(1), be, bk, bn, out.stride(0), out.stride(1),
                      ACCUMULATE=accumulate, FP32_IEEE=a.dtype == torch.float32, **tiles)
    return out


def grouped_wgrad(a, b, offsets, n_experts):
    """Per expert: a[rows]^T @ b[rows] -> (E, P, Q)."""
    P, Q = a.shape[1], b.shape[1]
    out = a.new_empty(n_experts, P, Q)
    t = tile_sizes(a.device)
    launch = {k: v for k, v in t.items() if k.startswith("num_")}
    grid = (n_experts, triton.cdiv(P, t["BLOCK_M"]) * triton.cdiv(Q, t["BLOCK_N"]))
    _grouped_wgrad[grid](a, b, out, offsets, P, Q, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), out.stride(2), FP32_IEEE=a.dtype == torch.float32,
                         BLOCK_P=t["BLOCK_M"], BLOCK_Q=t["BLOCK_N"], BLOCK_M=t["BLOCK_K"], **launch)
    return out


class GroupedSwiGLU(torch.autograd.Function):
    """y = (silu(x W1[e]^T) * (x W3[e]^T)) W2[e]^T for the rows of each expert e, with Triton."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, offsets):
        offsets = offsets.to(torch.int32)
        table = _tile_table(offsets, x.shape[0], tile_sizes(x.device)["BLOCK_M"])
        h1 = grouped_mm(x, w1, offsets, table, transpose_b=True)
        h3 = grouped_mm(x, w3, offsets, table, transpose_b=True)
        h = F.silu(h1) * h3
        ctx.save_for_backward(x, w1, w3, w2, offsets, h1, h3, *table)
        return grouped_mm(h, w2, offsets, table, transpose_b=True)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2, offsets, h1, h3, *table = ctx.saved_tensors
        dy = dy.contiguous()
        E = w1.shape[0]
        s = torch.sigmoid(h1)
        silu = h1 * s
        dh = grouped_mm(dy, w2, offsets, table)                       # (M, hidden) = dy @ W2[e]
        dh1 = dh * h3 * s * (1 + h1 * (1 - s))                        # silu'(z) = s (1 + z (1 - s))
        dh3 = dh * silu
        dx = grouped_mm(dh1, w1, offsets, table)                      # dh1 @ W1[e]
        dx = grouped_mm(dh3, w3, offsets, table, out=dx)              # + dh3 @ W3[e]
        dw1 = grouped_wgrad(dh1, x, offsets, E)                       # (E, hidden, d)
        dw3 = grouped_wgrad(dh3, x, offsets, E)
        dw2 = grouped_wgrad(dy, silu * h3, offsets, E)                # (E, d, hidden)
        return dx, dw1, dw3, dw2, None


def grouped_swiglu_triton(x, w1, w3, w2, offsets):
    return GroupedSwiGLU.apply(x.contiguous(), w1, w3, w2, offsets)


def grouped_swiglu(x, w1, w3, w2, offsets, backend: str = "auto"):
    """Dispatch: Triton on CUDA, torch._grouped_mm on CPU; tests force "triton" under TRITON_INTERPRET=1."""
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        return grouped_swiglu_triton(x, w1, w3, w2, offsets)
    if backend == "loop":
        return grouped_swiglu_loop(x, w1, w3, w2, offsets)
    return grouped_swiglu_torch(x, w1, w3, w2, offsets)


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)          # the router, replicated under TP
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.kept_experts: torch.Tensor | None = None               # pruning mask (E,) bool
        self.aux_loss: torch.Tensor | None = None                   # load-balancing loss of the last training forward
        self.usage: torch.Tensor | None = None                      # per-expert token counts when tracking
        self.backend = "auto"                                       # "auto" | "torch" | "triton" | "loop"

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=std)

    def prune(self, keep):
        """Route only to the experts in `keep`; the softmax renormalises over them (paper A.1)."""
        keep = sorted(set(int(e) for e in keep))
        if not keep or keep[0] < 0 or keep[-1] >= self.n_experts or len(keep) < self.top_k:
            raise ValueError(f"keep {keep}: need at least top_k={self.top_k} experts in 0..{self.n_experts - 1}")
        mask = torch.zeros(self.n_experts, dtype=torch.bool, device=self.gate.weight.device)
        mask[keep] = True
        self.kept_experts = mask

    def route(self, x):
        logits = self.gate(x).float()
        if self.kept_experts is not None:
            logits = logits.masked_fill(~self.kept_experts, float("-inf"))
        probs = logits.softmax(-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        return probs, top_w / top_w.sum(-1, keepdim=True), top_idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, top_w, top_idx = self.route(x)
        if self.training:
            self.aux_loss = load_balancing_loss(probs, top_idx, self.n_experts)
        order, counts, offsets = group_by_expert(top_idx, self.n_experts)
        if self.usage is not None:
            self.usage += counts.to(self.usage.device)
        token = order // self.top_k
        y = grouped_swiglu(x[token], self.w1, self.w3, self.w2, offsets, self.backend)
        y = y * top_w.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y).view(shape)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def set_top_k(model: nn.Module, k: int):
    """Change the number of active experts at load or sample time (paper A.1: k=2 best, k=4 on MME)."""
    for m in moe_layers(model):
        if not 1 <= k <= m.n_experts:
            raise ValueError(f"top_k {k} must be in 1..{m.n_experts}")
        m.top_k = k


def prune_experts(model: nn.Module, keep):
    """Keep only the experts in `keep` in every MoE layer (paper App. A.1.3: pruned experts at inference)."""
    for m in moe_layers(model):
        m.prune(keep)


def track_usage(model: nn.Module, on: bool = True):
    for m in moe_layers(model):
        m.usage = torch.zeros(m.n_experts, dtype=torch.long) if on else None


def usage_report(model: nn.Module) -> str:
    """One line per MoE layer: share of routed tokens per expert."""
    lines = []
    for i, m in enumerate(moe_layers(model)):
        if m.usage is None:
            continue
        share = m.usage.float() / max(int(m.usage.sum()), 1)
        lines.append(f"layer {i:2d}: " + " ".join(f"e{e}={s:5.1%}" for e, s in enumerate(share.tolist())))
    return "\n".join(lines)


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Load-balancing loss averaged over the MoE layers (the reference weights it by 0.01)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None
