"""The process mesh (DP x TP) and Megatron tensor parallelism as a few explicit autograd Functions
(picotron style).

f = copy_to_tp:      identity forward, all-reduce of the gradient backward (before column-split layers)
g = reduce_from_tp:  all-reduce forward, identity backward (after row-split layers)
vocab-parallel embedding and cross-entropy: each rank holds vocab/tp rows; full-vocab logits
are never gathered in training.

Every function takes the TP process group, and is the identity when it is None (one rank),
so model.py reads the same with and without tensor parallelism.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------- process mesh

@dataclass
class Mesh:
    rank: int
    world: int
    dp_rank: int
    dp: int
    tp_rank: int
    tp: int
    dp_group: object = None      # ranks holding the same TP shard (None when dp == 1)
    tp_group: object = None      # ranks sharing one model replica (None when tp == 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world_group(self):
        return dist.group.WORLD if self.world > 1 else None


def setup_mesh(tp: int, device: str = "cpu") -> Mesh:
    """world = dp x tp; TP ranks are adjacent (rank = dp_rank * tp + tp_rank), as in Megatron.
    NCCL between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world % tp:
        raise ValueError(f"--tp {tp} does not divide the {world} processes")
    if device == "mps" and world > 1:
        raise ValueError("--device mps runs one process (gloo reduces CPU tensors only); start it without torchrun")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dp_group = tp_group = None
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        for d in range(world // tp):                  # every rank creates every group, in the same order
            g = dist.new_group(list(range(d * tp, (d + 1) * tp)))
            if d == rank // tp and tp > 1:
                tp_group = g
        for t in range(tp):
            g = dist.new_group(list(range(t, world, tp)))
            if t == rank % tp and world // tp > 1:
                dp_group = g
    return Mesh(rank, world, rank // tp, world // tp, rank % tp, tp, dp_group, tp_group)


def all_reduce(t, group, op=None):
    """In place. NCCL only reduces GPU tensors: a CPU scalar (a count, a flag) travels through the GPU."""
    if group is not None:
        if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
            g = t.cuda()
            dist.all_reduce(g, op=op or dist.ReduceOp.SUM, group=group)
            t.copy_(g.cpu())
        else:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def agree(group, value, op: str = "sum") -> float:
    """Every rank of `group` ends with the same number: the sum (or max, min) of each rank's flag or count.
    How ranks agree to stop, skip, or refuse together instead of leaving the others in a collective."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    return all_reduce(torch.tensor(float(value), dtype=torch.float64), group, ops[op]).item()


def gather_lists(items: list, group) -> list:
    """Every rank's list, concatenated in rank order, on every rank of `group` (e.g. held-out answers)."""
    if group is None:
        return list(items)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    return [x for part in parts for x in part]


def barrier(mesh):
    if mesh.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- TP collectives

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


@torch.no_grad()
def split_rows_and_gather(fn, x, group):
    """fn over the rows of x with each TP rank taking a contiguous 1/tp of them, then all-gathered: the
    frozen, replicated encoders share the views this way instead of each rank encoding all of them (the
    reference splits whole images over its model-parallel ranks the same way). fn may return k rows per
    input row. x is padded with zero rows to a multiple of tp (the padding's results are dropped); no
    gradient crosses (the encoders are frozen)."""
    if group is None:
        return fn(x)
    tp, rank, n = dist.get_world_size(group), dist.get_rank(group), x.shape[0]
    per = -(-n // tp)
    x = torch.cat([x, x.new_zeros(per * tp - n, *x.shape[1:])]) if per * tp > n else x
    mine = fn(x[rank * per:(rank + 1) * per]).contiguous()
    out = mine.new_empty(mine.shape[0] * tp, *mine.shape[1:])
    dist.all_gather_single(out, mine, group=group)
    return out[: n * (mine.shape[0] // per)]


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


def tp_slice(name: str, shape, rank: int, world: int, expert_slot: bool = False):
    """(dim, start, stop) of this rank's part of the full tensor `name`, or None if it is replicated.
    expert_slot: the tensor is one expert's slice of a stacked parameter (no expert dim)."""
    d = split_dim(name)
    if d is None or world == 1:
        return None
    d -= expert_slot
    if shape[d] % world:
        raise ValueError(f"{name}: dim {d} of size {shape[d]} does not split over {world} TP ranks")
    size = shape[d] // world
    return d, rank * size, (rank + 1) * size


def shard(name: str, full: torch.Tensor, rank: int, world: int, expert_slot: bool = False) -> torch.Tensor:
    part = tp_slice(name, full.shape, rank, world, expert_slot)
    if part is None:
        return full
    d, a, b = part
    return full.narrow(d, a, b - a).contiguous()


def unshard(name: str, local: torch.Tensor, group) -> torch.Tensor:
    """All-gather a TP-sharded parameter into the full tensor (checkpoints)."""
    d = split_dim(name)
    if d is None or group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=d)


def partial_grad(name: str) -> bool:
    """A replicated parameter whose gradient each TP rank computes only in part: the MoE router, whose
    weights scale every rank's slice of the experts' output. Its gradient is summed over the TP group
    before the optimizer sees it; a loss term every TP rank computes in full on it (the load-balancing
    loss) must then be divided by the TP size, or its gradient would count TP times."""
    return name.endswith(".feed_forward.gate.weight")

