"""The SwiGLU experts of a sparse MoE layer, computed on rows grouped by expert (scattermoe's split:
the layer in moe.py, the kernels here).

One autograd Function over two primitives, a grouped matmul and a grouped weight gradient, with
four implementations ("paths"): Triton kernels (GPU), torch._grouped_mm, a per-expert loop, and a
bmm over rows padded to the busiest expert. `swiglu_reference`, a plain autograd loop over the
experts, states what every path computes; every test compares against it. Which CPU path is
fastest depends on the shape (the loop skips idle experts; the padded bmm keeps every core busy
when each expert has a handful of rows) and on the CPU, so `ExpertPathChooser` times them once per
shape bucket and remembers (like cudnn.benchmark; the choice, and so the last bits, can differ
between runs).

Triton is optional: without it (macOS, Windows, a CPU-only install) the kernels below are plain
functions that are never launched, and "auto" never picks them.
"""
from __future__ import annotations   # the kernels' `tl.constexpr` annotations are never evaluated

import math
import time

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                   # no wheels for macOS/Windows: the CPU paths still work
    triton = tl = None

HAS_TRITON = triton is not None
_jit = triton.jit if HAS_TRITON else (lambda fn: fn)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def swiglu_reference(x, w1, w3, w2, offsets):
    """One expert at a time through autograd: the plainest statement of what every path computes.
    x: (M, d) rows grouped by expert; offsets: (E,) end of each expert's rows."""
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

@_jit
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


@_jit
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
    t = torch.arange(cdiv(M, block_m) + E, device=offsets.device)
    e = torch.searchsorted(cum, t, right=True)
    ec = e.clamp(max=E - 1)
    row = starts[ec] + (t - (cum[ec] - tiles[ec])) * block_m
    return torch.where(e < E, e, -1).to(torch.int32), row.to(torch.int32)


class TritonPath:
    """The two Triton kernels; the plan is the tile table (no host sync, so CUDA graphs stay possible)."""

    @staticmethod
    def plan(offsets, M):
        offsets = offsets.to(torch.int32)
        return offsets, _tile_table(offsets, M, tile_sizes(offsets.device)["BLOCK_M"])

    @staticmethod
    def mm(a, w, plan, transpose_b=False, out=None):
        """a (M, K) grouped rows @ per-expert w[e] (K, N), or w[e]^T if transpose_b; into `out` if given."""
        offsets, (tile_expert, tile_row) = plan
        a, tiles = a.contiguous(), tile_sizes(a.device)
        be, bk, bn = w.stride()
        if transpose_b:
            bk, bn = bn, bk
        N = w.shape[1] if transpose_b else w.shape[2]
        accumulate = out is not None
        if out is None:
            out = a.new_empty(a.shape[0], N)
        grid = (tile_expert.numel(), cdiv(N, tiles["BLOCK_N"]))
        _grouped_mm[grid](a, w, out, tile_expert, tile_row, offsets, N, a.shape[1],
                          a.stride(0), a.stride(1), be, bk, bn, out.stride(0), out.stride(1),
                          ACCUMULATE=accumulate, FP32_IEEE=a.dtype == torch.float32, **tiles)
        return out

    @staticmethod
    def wgrad(a, b, plan, n_experts):
        """Per expert: a[rows]^T @ b[rows] -> (E, P, Q)."""
        offsets = plan[0]
        P, Q = a.shape[1], b.shape[1]
        out = a.new_empty(n_experts, P, Q)
        t = tile_sizes(a.device)
        launch = {k: v for k, v in t.items() if k.startswith("num_")}
        grid = (n_experts, cdiv(P, t["BLOCK_M"]) * cdiv(Q, t["BLOCK_N"]))
        _grouped_wgrad[grid](a, b, out, offsets, P, Q, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                             out.stride(0), out.stride(1), out.stride(2), FP32_IEEE=a.dtype == torch.float32,
                             BLOCK_P=t["BLOCK_M"], BLOCK_Q=t["BLOCK_N"], BLOCK_M=t["BLOCK_K"], **launch)
        return out


# ----------------------------------------------------------------------------- the CPU paths
#
# The same two primitives three ways. On a CPU a GEMM with a few rows runs on one core (BLAS does
# not split it), so which path wins depends on the rows per expert: measured in bench/bench_moe.py.

class GroupedPath:
    """torch._grouped_mm: one call per primitive (needs rows 16-byte aligned: d, hidden % 4 in fp32)."""

    @staticmethod
    def plan(offsets, M):
        return offsets.to(torch.int32)

    @staticmethod
    def mm(a, w, plan, transpose_b=False, out=None):
        y = torch._grouped_mm(a, w.transpose(1, 2) if transpose_b else w, offs=plan)
        return y if out is None else out.add_(y)

    @staticmethod
    def wgrad(a, b, plan, n_experts):
        return torch._grouped_mm(a.T, b, offs=plan)          # offsets along K give (E, P, Q)


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm, which FlopCounterMode has no formula for. Offsets along K (both operands 2-D)
    split one (P, K) x (K, Q) product into groups; otherwise every output element is a K-long dot product."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the in-place addmm_ (the loop path's accumulation), which FlopCounterMode counts only out of place."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# For FlopCounterMode(custom_mapping=...): the MFU of a run counts its experts whichever path the chooser picked.
FLOP_FORMULAS = {torch.ops.aten._grouped_mm: grouped_mm_flops, torch.ops.aten.addmm_: addmm_inplace_flops}


class LoopPath:
    """One torch.mm per expert that has rows: idle experts cost nothing (decoding: 2 of 8 busy)."""

    @staticmethod
    def plan(offsets, M):
        ends = offsets.tolist()                             # host sync: the CPU paths only
        return [(e, s, t) for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)) if t > s]

    @staticmethod
    def mm(a, w, spans, transpose_b=False, out=None):
        accumulate = out is not None
        if out is None:
            out = a.new_empty(a.shape[0], w.shape[1] if transpose_b else w.shape[2])
        for e, s, t in spans:
            we = w[e].T if transpose_b else w[e]
            if accumulate:
                out[s:t].addmm_(a[s:t], we)
            else:
                torch.mm(a[s:t], we, out=out[s:t])
        return out

    @staticmethod
    def wgrad(a, b, spans, n_experts):
        out = a.new_empty(n_experts, a.shape[1], b.shape[1])
        for e, s, t in spans:
            torch.mm(a[s:t].T, b[s:t], out=out[e])
        for e in set(range(n_experts)) - {e for e, _, _ in spans}:    # zeros only where nothing was written
            out[e].zero_()
        return out


class PaddedPath:
    """Each expert's rows padded with zeros to the busiest expert's count, then one bmm over experts,
    which keeps every core busy. Zero rows add nothing to the weight gradients; the waste is the
    padding, small when each expert has a handful of rows (short batches, 16 tokens)."""

    @staticmethod
    def plan(offsets, M):
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        width = int(counts.max()) if M else 0               # host sync: the CPU paths only
        expert = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts,
                                         output_size=M)
        slot = expert * width + torch.arange(M, device=offsets.device) - (offsets - counts)[expert]
        return slot, counts.numel(), width

    @staticmethod
    def pad(a, plan):
        slot, E, width = plan
        return a.new_zeros(E * width, a.shape[1]).index_copy_(0, slot, a).view(E, width, a.shape[1])

    @staticmethod
    def mm(a, w, plan, transpose_b=False, out=None):
        y = torch.bmm(PaddedPath.pad(a, plan), w.transpose(1, 2) if transpose_b else w).flatten(0, 1)[plan[0]]
        return y if out is None else out.add_(y)

    @staticmethod
    def wgrad(a, b, plan, n_experts):
        return torch.bmm(PaddedPath.pad(a, plan).transpose(1, 2), PaddedPath.pad(b, plan))


PATHS = {"triton": TritonPath, "grouped": GroupedPath, "loop": LoopPath, "padded": PaddedPath}


# ----------------------------------------------------------------------------- SwiGLU experts

def swiglu_forward(path, x, w1, w3, w2, offsets):
    """y = (silu(x W1[e]^T) * (x W3[e]^T)) W2[e]^T for the rows of each expert e; also what backward needs."""
    plan = path.plan(offsets, x.shape[0])
    h1 = path.mm(x, w1, plan, transpose_b=True)
    h3 = path.mm(x, w3, plan, transpose_b=True)
    return path.mm(F.silu(h1) * h3, w2, plan, transpose_b=True), (plan, h1, h3)


def swiglu_backward(path, dy, x, w1, w3, w2, plan, h1, h3):
    E = w1.shape[0]
    silu = F.silu(h1)
    dh = path.mm(dy, w2, plan)                                  # (M, hidden) = dy @ W2[e]
    dh1 = torch.ops.aten.silu_backward(dh * h3, h1)             # one fused pass for silu'(h1), not six
    dh3 = dh * silu
    dx = path.mm(dh1, w1, plan)                                 # dh1 @ W1[e]
    dx = path.mm(dh3, w3, plan, out=dx)                         # + dh3 @ W3[e]
    dw1 = path.wgrad(dh1, x, plan, E)                           # (E, hidden, d)
    dw3 = path.wgrad(dh3, x, plan, E)
    dw2 = path.wgrad(dy, silu * h3, plan, E)                    # (E, d, hidden)
    return dx, dw1, dw3, dw2


class SwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, offsets, path):
        y, (plan, h1, h3) = swiglu_forward(path, x, w1, w3, w2, offsets)
        ctx.path, ctx.plan = path, plan                         # plan: small index tensors or a list
        ctx.save_for_backward(x, w1, w3, w2, h1, h3)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w3, w2, h1, h3 = ctx.saved_tensors
        return *swiglu_backward(ctx.path, dy.contiguous(), x, w1, w3, w2, ctx.plan, h1, h3), None, None


def swiglu_experts(x, w1, w3, w2, offsets, path: str, chooser: ExpertPathChooser | None = None):
    """The SwiGLU experts on rows grouped by expert, by one of PATHS, "reference", or "auto" (Triton on a
    CUDA GPU when triton is installed, else the chooser's pick). Autocast is off inside, the choice's timing included: every path
    computes in its inputs' dtype (the model's), as _grouped_mm and Triton do anyway."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3, w2))
    with torch.autocast(x.device.type, enabled=False):
        if path == "auto":
            path = "triton" if x.is_cuda and HAS_TRITON else chooser(x, w1, w3, w2, offsets, grads)
        elif path == "triton" and not HAS_TRITON:
            raise RuntimeError("MoE path 'triton' needs the triton package (Linux wheels only); use 'auto'")
        if path == "reference":
            return swiglu_reference(x, w1, w3, w2, offsets)
        if not grads:
            return swiglu_forward(PATHS[path], x, w1, w3, w2, offsets)[0]     # inference: no autograd node
        return SwiGLUExperts.apply(x, w1, w3, w2, offsets, PATHS[path])


class ExpertPathChooser:
    """The fastest CPU path per shape bucket (rows rounded up to a power of two, weight shapes, dtype,
    with or without gradients), timed once on the first input of that bucket and remembered. One
    chooser serves every MoE layer of a model; the timings stay readable in `timings`."""

    CANDIDATES = ("grouped", "loop", "padded")
    BUDGET = 0.1            # seconds of timing per bucket beyond the warm-up: ~50 rounds at decode sizes, 2 at 4k tokens

    def __init__(self):
        self.best: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    def __call__(self, x, w1, w3, w2, offsets, grads: bool) -> str:
        key = (1 << max(x.shape[0] - 1, 0).bit_length(), tuple(w1.shape), tuple(w2.shape), x.dtype, grads)
        if key not in self.best:
            self.timings[key] = self.time_paths(grads, x, w1, w3, w2, offsets)
            self.best[key] = min(self.timings[key], key=self.timings[key].get)
        return self.best[key]

    def time_paths(self, grads, x, w1, w3, w2, offsets) -> dict[str, float]:
        """Best seconds of each candidate, measured in turn round after round (so a slow spell of the
        machine falls on all alike); inf for a path that cannot run these shapes. Forward and backward
        are called directly, with no autograd graph, so this also works inside activation checkpointing."""
        def runner(path):
            def run():
                with torch.no_grad():
                    y, saved = swiglu_forward(path, x, w1, w3, w2, offsets)
                    if grads:
                        swiglu_backward(path, y, x, w1, w3, w2, *saved)
            return run
        runs, warm_up = {}, {}
        for name in self.CANDIDATES:
            run = runner(PATHS[name])
            try:
                warm_up[name] = _seconds(run, x.device)
                runs[name] = run
            except RuntimeError:                                # e.g. _grouped_mm's alignment rule
                pass
        rounds = min(max(int(self.BUDGET / max(sum(warm_up.values()), 1e-9)), 2), 50)
        best = dict.fromkeys(self.CANDIDATES, float("inf"))
        for _ in range(rounds):
            for name, run in runs.items():
                best[name] = min(best[name], _seconds(run, x.device))
        return best


def _seconds(fn, device: torch.device) -> float:
    """Wall time of fn(), waiting for an accelerator's queue (a GPU without triton, or mps) at both ends."""
    sync = getattr(torch, device.type).synchronize if device.type in ("cuda", "mps") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t
