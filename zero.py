"""ZeRO-2 by hand (Rajbhandari et al., arXiv:1910.02054, stage 2): each data-parallel rank keeps only
its 1/DP shard of the gradients, the fp32 master weights and the AdamW moments.

Trainable parameters are views into flat buckets; DP rank r owns the r-th 1/DP slice of every bucket.
During backward, a post-accumulate-grad hook counts each bucket's parameters in; as soon as a bucket
is complete it is reduce-scattered into this rank's fp32 gradient shard, asynchronously (the rest of
the backward runs meanwhile), and its full gradients are freed. So a rank never holds the whole
gradient: at most the buckets still filling and MAX_IN_FLIGHT flat buffers, plus its shards.

Collectives must be issued in the same order on every rank, while which parameters get a gradient
can differ between DP ranks (the skip token and image tags go unused in a batch without padded views
or images): buckets are therefore launched in one fixed order (the reverse of their build order,
which is about the order backward completes them), a complete bucket waiting for the ones before it,
and reduce_gradients() launches whatever is left after the backward.

With gradient accumulation every micro-batch communicates: holding the full gradient until the last
micro-batch would be exactly the memory ZeRO-2 exists to remove.

The step clips by the global norm (across DP and TP), runs AdamW on the fp32 master shard, and
all-gathers the updated shards back into the buckets. Frozen parameters (the encoders) are never seen.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist

from checkpoint import CheckpointError
from parallel import Mesh, all_reduce, partial_grad, split_dim

MAX_IN_FLIGHT = 2       # asynchronous reduce-scatters pending at once (each holds a bucket-sized buffer)


class ZeRO2:
    def __init__(self, named_params, mesh: Mesh, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 bucket_numel=8 << 20, lr_scale=lambda name: 1.0, overlap: bool = True):
        """lr_scale(name): a per-parameter multiplier of the lr (the fresh projector's own rate).
        overlap=False: no hooks; every bucket is reduced by reduce_gradients() after the backward."""
        self.mesh, self.lr, self.betas, self.eps, self.wd = mesh, lr, betas, eps, weight_decay
        self.step_count = 0
        self.buckets = []
        cur, n = [], 0
        for name, p in named_params:
            if cur and n + p.numel() > bucket_numel:
                self.buckets.append(cur)
                cur, n = [], 0
            cur.append((name, p))
            n += p.numel()
        if cur:
            self.buckets.append(cur)
        dp, r = mesh.dp, mesh.dp_rank
        self.flat, self.master, self.m, self.v, self.grad, self.norm_w, self.sizes = [], [], [], [], [], [], []
        self.lr_w = []          # per-element lr multiplier (lr_scale of the parameter it belongs to)
        for bucket in self.buckets:
            numel = sum(p.numel() for _, p in bucket)
            padded = math.ceil(numel / dp) * dp
            flat = torch.zeros(padded, dtype=bucket[0][1].dtype, device=bucket[0][1].device)
            w, lr_w = torch.zeros(padded), torch.ones(padded)
            off = 0
            for name, p in bucket:
                flat[off:off + p.numel()].copy_(p.detach().flatten())
                p.data = flat[off:off + p.numel()].view_as(p)
                # Replicated parameters count once in the global norm (on TP rank 0); TP shards everywhere.
                w[off:off + p.numel()] = 1.0 if (split_dim(name) is not None or mesh.tp_rank == 0) else 0.0
                lr_w[off:off + p.numel()] = lr_scale(name)
                off += p.numel()
            S = padded // dp
            own = slice(r * S, (r + 1) * S)
            self.flat.append(flat)
            self.sizes.append(numel)
            self.master.append(flat[own].float().clone())
            self.m.append(torch.zeros(S, device=flat.device))
            self.v.append(torch.zeros(S, device=flat.device))
            self.grad.append(torch.zeros(S, device=flat.device))
            self.norm_w.append(w[own].to(flat.device))
            self.lr_w.append(None if bool((lr_w == 1).all()) else lr_w[own].to(flat.device))
        # Launch state of the current backward: parameters with a gradient per bucket, next bucket to launch.
        self.order = list(reversed(range(len(self.buckets))))
        self.ready = [0] * len(self.buckets)
        self.next = 0
        self.in_flight = []
        self.hooks_on = overlap
        # Full-gradient elements held now (parameters' .grad as the hooks see them, flat buffers) and the
        # most held at once: what ZeRO-2 bounds. Counted with overlap only (no hooks see .grad otherwise).
        self.alive = 0
        self.peak_grad_numel = 0
        if overlap:
            for i, bucket in enumerate(self.buckets):
                for _, p in bucket:
                    p.register_post_accumulate_grad_hook(lambda p, i=i: self._grad_ready(i, p))

    # --------------------------------------------------------------- gradients: bucket by bucket

    @contextmanager
    def hooks_paused(self):
        """A backward whose gradients are not for the optimizer (e.g. a throw-away FLOP-counting pass)."""
        on, self.hooks_on = self.hooks_on, False
        try:
            yield
        finally:
            self.hooks_on = on

    def _grad_ready(self, i, p):
        if not self.hooks_on:
            return
        self.ready[i] += 1
        self._hold(p.numel())
        while self.next < len(self.order) and self.ready[self.order[self.next]] == len(self.buckets[self.order[self.next]]):
            self._launch(self.order[self.next])
            self.next += 1

    def _hold(self, numel):
        self.alive += numel
        self.peak_grad_numel = max(self.peak_grad_numel, self.alive)

    def take_flat_grad(self, i):
        """Bucket i's gradients as one fp32 vector (zeros where a parameter got none); frees them. The
        router's partial gradient is first summed over TP (parallel.partial_grad)."""
        full = torch.zeros_like(self.flat[i], dtype=torch.float32)
        self._hold(full.numel())
        off = 0
        for name, p in self.buckets[i]:
            if p.grad is not None:
                if partial_grad(name):
                    all_reduce(p.grad, self.mesh.tp_group)
                full[off:off + p.numel()] = p.grad.flatten()
                p.grad = None
                if self.hooks_on:
                    self._hold(-p.numel())
            off += p.numel()
        return full

    def _launch(self, i):
        """Start summing bucket i over DP into this rank's shard."""
        full = self.take_flat_grad(i)
        if self.mesh.dp_group is None:
            self.grad[i] += full
            self._hold(-full.numel())
            return
        part = torch.empty_like(self.grad[i])
        work = dist.reduce_scatter_single(part, full, group=self.mesh.dp_group, async_op=True)
        self.in_flight.append((i, part, work, full))
        while len(self.in_flight) > MAX_IN_FLIGHT:
            self._finish_oldest()

    def _finish_oldest(self):
        i, part, work, full = self.in_flight.pop(0)
        work.wait()
        self.grad[i] += part
        self._hold(-full.numel())                       # the flat buffer goes now

    def reduce_gradients(self):
        """After a micro-batch's backward (or in place of one, for a rank whose micro-batch was empty):
        launch the buckets the hooks did not, wait for every reduction, and reset for the next backward."""
        for i in self.order[self.next:]:
            self._launch(i)
        while self.in_flight:
            self._finish_oldest()
        self.ready = [0] * len(self.buckets)
        self.next = 0

    # --------------------------------------------------------------- the step: AdamW on the shard

    def shard_slice(self, i):
        S = self.flat[i].numel() // self.mesh.dp
        return slice(self.mesh.dp_rank * S, (self.mesh.dp_rank + 1) * S)

    def publish_shards(self):
        """Write this rank's master shard into the buckets, then all-gather every rank's shard."""
        for i in range(len(self.buckets)):
            own = self.shard_slice(i)
            self.flat[i][own] = self.master[i].to(self.flat[i].dtype)
            if self.mesh.dp_group is not None:
                dist.all_gather_single(self.flat[i], self.flat[i][own].clone(), group=self.mesh.dp_group)

    @torch.no_grad()
    def step(self, lr, clip):
        sumsq = torch.zeros((), dtype=torch.float64)
        for g, w in zip(self.grad, self.norm_w):
            sumsq += torch.dot(g * w, g).double().cpu()   # per bucket fp32 (relative error ~1e-7: clipping only)
        norm = all_reduce(sumsq, self.mesh.world_group).sqrt().item()
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        for i in range(len(self.buckets)):             # AdamW in torch.optim.AdamW's form, in place
            g = self.grad[i].mul_(scale)
            self.m[i].lerp_(g, 1 - b1)
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            if self.wd:
                self.master[i].mul_(1 - lr * self.wd)
            denom = self.v[i].sqrt().div_(math.sqrt(c2)).add_(self.eps)
            m = self.m[i] if self.lr_w[i] is None else self.m[i] * self.lr_w[i]
            self.master[i].addcdiv_(m, denom, value=-lr / c1)
            self.grad[i].zero_()
        self.publish_shards()
        return norm

    # --------------------------------------------------------------- state

    def state_bytes(self) -> int:
        """Per-rank bytes of gradient shard + fp32 master + AdamW moments."""
        return sum(4 * (g.numel() + ms.numel() + m.numel() + v.numel())
                   for g, ms, m, v in zip(self.grad, self.master, self.m, self.v))

    def state_dict(self) -> dict:
        return {"step": self.step_count, "dp": self.mesh.dp, "sizes": self.sizes,
                "names": [[n for n, _ in b] for b in self.buckets],
                "master": self.master, "m": self.m, "v": self.v}

    def load_shards(self, shards: list[dict]):
        """Load the shards of all old DP ranks (same TP rank), whatever the old DP size was."""
        if [[n for n, _ in b] for b in self.buckets] != shards[0]["names"] or shards[0]["sizes"] != self.sizes:
            raise CheckpointError("optimizer state does not match the model's trainable parameters")
        self.step_count = shards[0]["step"]
        for key, dst in (("master", self.master), ("m", self.m), ("v", self.v)):
            for i in range(len(self.buckets)):
                full = torch.cat([s[key][i] for s in shards])[: self.sizes[i]]
                full = torch.nn.functional.pad(full, (0, self.flat[i].numel() - self.sizes[i]))
                dst[i].copy_(full[self.shard_slice(i)])
        self.publish_shards()
