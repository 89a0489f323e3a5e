"""Megatron tensor parallelism as a few explicit autograd Functions (picotron style).

f = copy_to_tp:      identity forward, all-reduce of the gradient backward (before column-split layers)
g = reduce_from_tp:  all-reduce forward, identity backward (after row-split layers)
vocab-parallel embedding and cross-entropy: each rank holds vocab/tp rows; full-vocab logits
are never gathered in training.

Every function takes the TP process group, and is the identity when it is None (one rank),
so model.py reads the same with and without tensor parallelism.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group):
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group is None else _ReduceFromTP.apply(x, group)


def vocab_parallel_embedding(tokens, weight, group):
    """weight holds rows [lo, hi) of the vocabulary on this rank; other ids contribute zeros, then g."""
    if group is None:
        return F.embedding(tokens, weight)
    lo = dist.get_rank(group) * weight.shape[0]
    local = tokens - lo
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight).masked_fill(outside[..., None], 0.0)
    return reduce_from_tp(out, group)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits (B*T, V/tp): max, sum-exp and the target
    logit are all-reduced as scalars per token; the gradient is softmax - onehot on each shard."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, group):
        logits = logits.float()
        n = logits.shape[-1]
        lo = dist.get_rank(group) * n
        m = logits.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - m[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - lo
        mine = (local >= 0) & (local < n)
        idx = local.clamp(0, n - 1)
        target_logit = shifted.gather(1, idx[:, None]).squeeze(1) * mine
        dist.all_reduce(target_logit, group=group)
        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit) * valid
        ctx.save_for_backward(exp / sum_exp[:, None], idx, mine & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, hit, valid = ctx.saved_tensors
        g = softmax
        g[torch.arange(len(idx)), idx] -= hit.float()
        return g * (grad * valid)[:, None], None, None, None


def cross_entropy_sum(logits, targets, ignore_index: int, group):
    """Sum of per-token losses over non-ignored targets; logits (N, V) or (N, V/tp) under TP."""
    if group is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return _VocabParallelCE.apply(logits, targets, ignore_index, group).sum()


def gather_vocab(logits, group):
    """Full-vocab logits from shards (generation and evaluation only)."""
    if group is None:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


# Which dimension of each parameter is split under TP (by the last two name components);
# everything else (norms, router gate, MoV, projector, image tags) is replicated.
_SPLIT = {"wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "wo.weight": 1,
          "tok_embeddings.weight": 0, "output.weight": 0}
_SPLIT_DENSE_FFN = {"w1.weight": 0, "w3.weight": 0, "w2.weight": 1}
_SPLIT_MOE = {"w1": 1, "w3": 1, "w2": 2}          # stacked experts (E, hidden, d) / (E, d, hidden)


def split_dim(name: str) -> int | None:
    tail2 = ".".join(name.split(".")[-2:])
    tail1 = name.split(".")[-1]
    if tail2 in _SPLIT:
        return _SPLIT[tail2]
    if ".feed_forward." in name:
        if tail2 in _SPLIT_DENSE_FFN:
            return _SPLIT_DENSE_FFN[tail2]
        if tail1 in _SPLIT_MOE:
            return _SPLIT_MOE[tail1]
    return None


def shard(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    d = split_dim(name)
    if d is None or world == 1:
        return full
    if full.shape[d] % world:
        raise ValueError(f"{name}: dim {d} of size {full.shape[d]} does not split over {world} TP ranks")
    return full.chunk(world, dim=d)[rank].contiguous()


def unshard(name: str, local: torch.Tensor, group) -> torch.Tensor:
    """All-gather a TP-sharded parameter into the full tensor (checkpoints)."""
    d = split_dim(name)
    if d is None or group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=d)
